"""Efficient (linear) attention: softmax of Q over channels, softmax of K over tokens, context = K^T V.

Shen et al., "Efficient Attention: Attention with Linear Complexities", WACV 2021 (arXiv:1812.01243).

Cost O(L d^2) instead of O(L^2 d). Two fixes over the seed (000): the softmax normalisations are kept (the seed's
LayerNorm replacement is unnormalised and can blow up), and the support enters as M extra key/value tokens instead of
being broadcast to L copies. Because the key softmax runs over tokens, the query-token part of the context
(sum of exp(k) v^T and its normaliser) does not depend on the class: :meth:`EfficientLinearAttention.forward` computes
it once per image and adds each class's M support tokens with a log-sum-exp-stable merge, so an extra class costs one
``[L, d] x [d, d]`` product instead of a full attention pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SupportAttention, cat_support


def _key_stats(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel max, sum_i exp(k_i - max) v_i^T and sum_i exp(k_i - max) over the token axis.

    Args:
        k: Keys ``[..., T, d]``.
        v: Values ``[..., T, d]``.

    Returns:
        ``m [..., 1, d]``, ``s [..., d, d]``, ``z [..., 1, d]``.
    """
    m = k.amax(-2, keepdim=True)
    e = (k - m).exp()
    return m, e.transpose(-2, -1) @ v, e.sum(-2, keepdim=True)


class EfficientLinearAttention(SupportAttention):
    """Shen et al. efficient attention with support tokens."""

    name = "linear"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ks: Tensor | None, vs: Tensor | None, hw=None) -> Tensor:
        k, v = cat_support(k, v, ks, vs)
        context = k.softmax(-2).transpose(-2, -1) @ v  # [B', h, d, d]
        return q.softmax(-1) @ context

    def forward(
        self,
        x: Tensor,
        support: Tensor | None = None,
        hw: tuple[int, int] | None = None,
        x_qk: Tensor | None = None,
        gate: Tensor | None = None,
    ) -> Tensor:
        """Fast path: the query-token statistics are shared by all classes (see module docstring)."""
        if support is None:
            return super().forward(x, None, hw, x_qk, gate)
        xq = x if x_qk is None else x_qk
        b = x.shape[0]
        q = self.heads(self.q(xq)).softmax(-1)  # [B, h, L, d]
        mq, sq, zq = _key_stats(self.heads(self.k(xq)), self.heads(self.v(x)))  # [B, h, 1|d, d]
        s = support.expand(b, *support.shape[1:])  # [B, N, M, C]
        ms, ss, zs = _key_stats(self.heads(self.k(s)), self.heads(self.v(s)))  # [B, N, h, 1|d, d]
        mq, sq, zq = mq.unsqueeze(1), sq.unsqueeze(1), zq.unsqueeze(1)
        m = torch.maximum(mq, ms)
        aq, as_ = (mq - m).exp(), (ms - m).exp()  # rescale both partial sums to the common max
        num = sq * aq.transpose(-2, -1) + ss * as_.transpose(-2, -1)  # row i of K^T V is scaled by channel i's factor
        den = zq * aq + zs * as_
        context = num / den.transpose(-2, -1)  # [B, N, h, d, d]
        o = q.unsqueeze(1) @ context  # [B, N, h, L, d]
        return self.output(o.flatten(0, 1), gate)
