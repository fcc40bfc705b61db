"""Embeddings of training instances, computed once and kept on disk (so a frozen encoder never runs per step).

Like Ultralytics caches decoded images, the episodic trainer asks this cache for the embedding of every
(image, box) instance it may use as a reference. Entries are keyed by the encoder spec, the image file's bytes
(sha256) and the box, so editing an image or switching encoders never serves stale embeddings. Each instance is stored
with a few deterministic augmented views (view 0: the crop; 1: flipped; 2: wider context; 3: flipped, wider context),
and the trainer samples among them. One ``.safetensors`` shard per image, written atomically, under
``<root>/<encoder hash>/``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import replace_atomic
from ..encoders.base import SupportEncoder
from .crops import CROP_VERSION, file_digest, make_crop

VIEWS = ((False, 0.1), (True, 0.1), (False, 0.3), (True, 0.3))  # (horizontal flip, context)


def view_crops(src, box, size: int, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``views`` of :data:`VIEWS` of one instance: crops ``[V, 3, S, S]`` and masks ``[V, 1, S, S]``."""
    crops, masks = [], []
    for flip, ctx in VIEWS[:views]:
        c, m = make_crop(src, box, size, ctx)
        crops.append(c.flip(-1) if flip else c)
        masks.append(m.flip(-1) if flip else m)
    return torch.stack(crops), torch.stack(masks)


def _box_key(box) -> str:
    return "full" if box is None else "_".join(f"{float(v):.1f}" for v in box)


class EmbeddingCache:
    """On-disk cache of per-instance, per-view, per-level embeddings.

    Args:
        root: Cache directory (e.g. next to the dataset's labels).
        encoder: The frozen support encoder.
        views: Number of views per instance (1–4, see :data:`VIEWS`).
    """

    def __init__(self, root: str | Path, encoder: SupportEncoder, views: int = 2) -> None:
        if not 1 <= views <= len(VIEWS):
            raise ValueError(f"views must be in 1..{len(VIEWS)}, got {views}")
        self.encoder, self.views = encoder, views
        # (entries of an older crop framing are not reused: the tag changes with it)
        key = {**encoder.spec.to_dict(), "crop_version": CROP_VERSION}
        tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self.encoded = 0  # instances encoded by this object (the rest came from disk)

    def _shard(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.safetensors"

    def embed(self, items: Sequence[tuple[str | Path, Sequence[float] | None]], batch: int = 32) -> list[list[Tensor]]:
        """Embeddings of ``(image path, box xyxy or None)`` instances.

        Returns:
            For each item, per level ``[views, M, D_l]``.
        """
        from safetensors.torch import load_file, save_file

        digests = {str(p): file_digest(p) for p in {str(p) for p, _ in items}}
        loaded: dict[str, dict[str, Tensor]] = {}
        for p, d in digests.items():
            shard = self._shard(d)
            loaded[p] = load_file(shard) if shard.is_file() else {}
        todo = [
            (p, b)
            for p, b in dict.fromkeys((str(p), None if b is None else tuple(b)) for p, b in items)
            if f"{_box_key(b)}.l0" not in loaded[p]
        ]
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            views = [view_crops(p, b, self.encoder.spec.input_size, self.views) for p, b in chunk]
            levels = self.encoder.encode(
                torch.cat([c for c, _ in views]), torch.cat([m for _, m in views]), batch=batch
            )
            for j, (p, b) in enumerate(chunk):
                for lv, e in enumerate(levels):
                    loaded[p][f"{_box_key(b)}.l{lv}"] = e[j * self.views : (j + 1) * self.views].contiguous()
            self.encoded += len(chunk)
            for p in {p for p, _ in chunk}:  # persist after every batch: an interrupted run keeps its work
                replace_atomic(self._shard(digests[p]), lambda tmp, t=loaded[p]: save_file(t, tmp))
        n_levels = len(self.encoder.spec.dims)
        return [[loaded[str(p)][f"{_box_key(b)}.l{lv}"] for lv in range(n_levels)] for p, b in items]
