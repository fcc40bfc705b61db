"""The instance table of a split: every labelled box of the chosen classes, with its cached embeddings (frozen
encoder) or its crops (trainable encoder, which encodes them every step)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..encoders.base import SupportEncoder
from ..references.cache import EmbeddingCache, view_crops
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


def _instances(labels: Sequence[dict], classes: Sequence[int], min_side: float) -> tuple[list, list, list]:
    """``(image, box xyxy px)`` items, their images and classes, for every box of ``classes`` in Ultralytics dataset
    ``labels`` (``im_file``, ``cls`` [n, 1], ``bboxes`` normalised xywh); boxes under ``min_side`` px are skipped."""
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
    return items, image, cls


def instance_table(
    labels: Sequence[dict],
    classes: Sequence[int],
    encoder: SupportEncoder,
    cache_dir: str | Path,
    views: int = 2,
    min_side: float = 2.0,
) -> InstanceTable:
    """Embed every box of ``classes`` once, through the on-disk cache (frozen encoder)."""
    items, image, cls = _instances(labels, classes, min_side)
    emb = EmbeddingCache(cache_dir, encoder, views).embed(items) if items else []
    return InstanceTable(image, cls, emb)


def crop_table(
    labels: Sequence[dict], classes: Sequence[int], size: int, views: int = 2, min_side: float = 2.0
) -> InstanceTable:
    """Keep every box's view crops in memory as uint8 (trainable encoder: encoded every step, nothing to cache)."""
    items, image, cls = _instances(labels, classes, min_side)
    crops = torch.zeros(len(items), views, 3, size, size, dtype=torch.uint8)
    masks = torch.zeros(len(items), views, 1, size, size, dtype=torch.uint8)
    for j, (p, b) in enumerate(items):
        c, m = view_crops(p, b, size, views)
        crops[j], masks[j] = (c * 255).round().to(torch.uint8), (m * 255).round().to(torch.uint8)
    return InstanceTable(image, cls, None, crops, masks)
