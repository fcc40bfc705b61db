"""Performer attention: FAVOR+ positive orthogonal random features approximating softmax attention in O(L m d).

Choromanski et al., "Rethinking Attention with Performers", ICLR 2021 (arXiv:2009.14794).

phi(x) = exp(w^T x' - |x'|^2 / 2) / sqrt(m) with x' = x d^(-1/4) and w drawn as blocks of orthogonal Gaussian rows,
so that E[phi(q)^T phi(k)] = exp(q^T k / sqrt(d)). The approximation error shrinks as ``num_features`` grows (tested).
The random matrix is a persistent buffer, so a checkpoint reproduces the same function; :meth:`redraw` resamples it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import SupportAttention, cat_support


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator | None = None) -> Tensor:
    """``[m, d]`` rows: stacked blocks of orthogonal directions with chi(d)-distributed norms (FAVOR+, Sec. 2.4)."""
    blocks, left = [], m
    while left > 0:
        g = torch.randn(d, d, generator=generator)
        qm, _ = torch.linalg.qr(g)
        blocks.append(qm.T[: min(left, d)])
        left -= d
    w = torch.cat(blocks)
    norms = torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)
    return w * norms


class PerformerAttention(SupportAttention):
    """FAVOR+ attention with support tokens.

    Args:
        dim: Token width C.
        num_heads: Number of heads.
        num_features: Random features m per head (default: 2 * head_dim, at least 16).
        seed: Seed of the random feature draw (deterministic construction).
    """

    name = "performer"

    def __init__(
        self, dim: int, num_heads: int = 4, qkv_bias: bool = True, num_features: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias)
        self.num_features = num_features or max(16, 2 * self.head_dim)
        self.register_buffer("omega", torch.empty(self.num_features, self.head_dim))
        self.redraw(seed)

    @torch.no_grad()
    def redraw(self, seed: int | None = None) -> None:
        """Resample the random features (in place, same shape)."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        self.omega.copy_(orthogonal_gaussian(self.num_features, self.head_dim, gen))

    def features(self, x: Tensor, is_query: bool) -> Tensor:
        """Positive random features ``[..., T, m]`` of ``x [..., T, d]``.

        The stabilising max is per token for queries and per sequence for keys: both cancel in the final ratio.
        """
        x = x * self.head_dim**-0.25
        proj = x @ self.omega.T - x.pow(2).sum(-1, keepdim=True) / 2
        stab = proj.amax(-1, keepdim=True) if is_query else proj.amax((-2, -1), keepdim=True)
        return (proj - stab.detach()).exp() / math.sqrt(self.num_features)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ks: Tensor | None, vs: Tensor | None, hw=None) -> Tensor:
        k, v = cat_support(k, v, ks, vs)
        qf, kf = self.features(q, True), self.features(k, False)  # [B', h, L, m], [B', h, T, m]
        kv = kf.transpose(-2, -1) @ v  # [B', h, m, d]
        den = qf @ kf.sum(-2, keepdim=True).transpose(-2, -1)  # [B', h, L, 1]
        return (qf @ kv) / den.clamp_min(1e-6)
