"""The instance table of a split: every labelled box of the chosen classes, with its cached embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..encoders.base import SupportEncoder
from ..references.cache import EmbeddingCache
from .episodes import InstanceTable


def label_shape(label: dict) -> tuple[int, int]:
    """(h, w) of a label's image: its ``shape``, or — after Ultralytics' rect mode popped it — the image header."""
    if "shape" in label:
        return tuple(int(v) for v in label["shape"])
    from PIL import Image
    from ultralytics.data.utils import exif_size

    with Image.open(label["im_file"]) as im:
        w, h = exif_size(im)
    return int(h), int(w)


def instance_table(
    labels: Sequence[dict],
    classes: Sequence[int],
    encoder: SupportEncoder,
    cache_dir: str | Path,
    views: int = 2,
    min_side: float = 2.0,
) -> InstanceTable:
    """Embed every box of ``classes`` in Ultralytics dataset ``labels`` (through the on-disk cache).

    Args:
        labels: ``dataset.labels`` entries (``im_file``, ``shape`` (h, w), ``cls`` [n, 1], ``bboxes`` normalised xywh).
        classes: Class ids to include.
        encoder: Frozen support encoder.
        cache_dir: Embedding cache directory.
        views: Augmented views per instance.
        min_side: Boxes smaller than this (pixels) are skipped: nothing to encode.
    """
    keep = {int(c) for c in classes}
    items, image, cls = [], [], []
    for lb in labels:
        h, w = label_shape(lb)
        for c, (x, y, bw, bh) in zip(lb["cls"].reshape(-1).tolist(), lb["bboxes"].tolist()):
            if int(c) not in keep or bw * w < min_side or bh * h < min_side:
                continue
            box = [
                max(0.0, (x - bw / 2) * w),
                max(0.0, (y - bh / 2) * h),
                min(w, (x + bw / 2) * w),
                min(h, (y + bh / 2) * h),
            ]
            items.append((lb["im_file"], box))
            image.append(lb["im_file"])
            cls.append(int(c))
    emb = EmbeddingCache(cache_dir, encoder, views).embed(items) if items else []
    return InstanceTable(image, cls, emb)
