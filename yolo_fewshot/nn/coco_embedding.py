"""COCO embedding: a crop's masked mean on the ported COCO CenterNet's stride-16 map, a second view for category search.

Zhou, Wang & Krähenbühl, "Objects as Points", 2019 (the detector); Howard et al., "Searching for MobileNetV3", 2019
(its trunk, level ``c4``). The ImageNet trunk's P5 is the verifier's embedding; this one was trained to tell COCO's 80
classes apart in photographs (fruit, vehicles, animals...), which is what category search needs and ImageNet
features average away (another apple than the reference). The two disagree on which objects are alike, and their
mean cosine ranks categories better than either where COCO knows the category (fruit, vegetables, vehicles) and a
little worse than ImageNet's alone where it does not (flowers, plants), with perfect boxes
(``tools/probe_category.py --coco-share``); in the detector, centred on reference photos, it helped every fold
(docs/benchmark.md, "A second embedding for categories").

Both sides are **centred** before the cosine: the network's features share a large common component (ReLU maps), so
uncentred cosines of any two objects are high and bunched. The centre is the mean embedding of reference photos of the
model's training (base) classes — a statistic of its training data, stored with the model (``coco_center``) like a
normalisation layer's; reference photos, not scene crops, because the references are what the prototypes are made of
(a centre taken from the training scenes' pasted objects, another domain, lowered fold 2's categories).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..encoders.base import masked_mean

LEVEL = "c4"  # the CenterNet trunk's stride-16 stage (88 channels); adding c5 lowered folds 0 / 2 on the probe


@torch.no_grad()
def coco_embed(crops: Tensor, masks: Tensor, batch: int = 64) -> Tensor:
    """Masked means ``[K, D]`` of crops ``[K, 3, S, S]`` (RGB in [0, 1]) over masks ``[K, 1, S, S]`` on the COCO
    CenterNet trunk's :data:`LEVEL` map (the network is the verifier's shared, cached copy), in float32."""
    from .verify import centernet

    net = centernet(crops.device)
    out = [
        masked_mean(net.trunk(crops[i : i + batch].float() * 255)[LEVEL], masks[i : i + batch].float())
        for i in range(0, len(crops), batch)
    ]
    return torch.cat(out) if out else crops.new_zeros((0, 0), dtype=torch.float32)


def coco_center(embeddings: Tensor) -> Tensor:
    """The centre ``[D]`` of reference embeddings ``[K, D]``: their mean (one-line ValueError without any)."""
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"a COCO centre needs reference embeddings [K, D] with K >= 1, got {tuple(embeddings.shape)}")
    return embeddings.float().mean(0)
