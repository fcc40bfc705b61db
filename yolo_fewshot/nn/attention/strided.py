"""Strided (dilated) attention: every query attends to a strided sub-grid of the tokens plus the support tokens.

Child et al., "Generating Long Sequences with Sparse Transformers", 2019 (arXiv:1904.10509), strided pattern; seed 002.

On a feature map the sub-grid is 2-D (every ``stride``-th row and column), a coarse global view at O(L^2 / stride^2).
``stride=1`` is exactly softmax attention (tested).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import SupportAttention, cat_support, resolve_hw


class StridedAttention(SupportAttention):
    """Softmax attention over a strided key grid.

    Args:
        dim: Token width C.
        num_heads: Number of heads.
        stride: Key sub-sampling step along each spatial axis.
    """

    name = "strided"

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = True, stride: int = 2) -> None:
        super().__init__(dim, num_heads, qkv_bias)
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.stride = stride

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ks: Tensor | None, vs: Tensor | None, hw=None) -> Tensor:
        h, w = resolve_hw(hw, k.shape[-2])
        s = self.stride
        if s > 1:
            k = k.unflatten(-2, (h, w))[..., ::s, ::s, :].flatten(-3, -2)
            v = v.unflatten(-2, (h, w))[..., ::s, ::s, :].flatten(-3, -2)
        k, v = cat_support(k, v, ks, vs)
        return F.scaled_dot_product_attention(q, k, v)
