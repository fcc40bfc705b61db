"""K reference embeddings -> one prototype per class and level.

* ``mean``: the arithmetic mean (what YOLOE users asked for, Ultralytics #21479).
* ``robust``: the geometric median (Weiszfeld's algorithm; Vardi & Zhang 2000 for the fixed point), the point that
  minimises the sum of distances: a single outlier reference (a wrong photo, a bad box) moves it by a bounded amount
  whereas it drags the mean by 1/K of its distance. With K <= 2 both coincide with the mean.

Aggregation is per token and per level, so the K embeddings of shape ``[K, M, D]`` become ``[M, D]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

METHODS = ("mean", "robust")


def geometric_median(x: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Geometric median of the rows of ``x [K, D]`` -> ``[D]`` (Weiszfeld iterations from the mean)."""
    y = x.mean(0)
    for _ in range(iters):
        d = (x - y).norm(dim=1).clamp_min(eps)
        w = 1 / d
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= eps * (1 + y.norm()):
            return y_new
        y = y_new
    return y


def aggregate(emb: Tensor, method: str = "mean") -> Tensor:
    """Aggregate ``[K, M, D]`` embeddings of one class and level into ``[M, D]``.

    Raises:
        ValueError: On an unknown method or no embedding.
    """
    if method not in METHODS:
        raise ValueError(f"unknown aggregation '{method}'; choose one of {', '.join(METHODS)}")
    if emb.shape[0] == 0:
        raise ValueError("no reference embedding to aggregate")
    if method == "mean" or emb.shape[0] <= 2:
        return emb.mean(0)
    return torch.stack([geometric_median(emb[:, m].double()).to(emb.dtype) for m in range(emb.shape[1])])
