"""Plain scaled dot-product attention over the query tokens plus the support tokens (the O(L^2) reference).

Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import SupportAttention, cat_support


class SoftmaxAttention(SupportAttention):
    """Exact softmax attention; every other kernel is checked against it where an exact relation exists."""

    name = "softmax"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ks: Tensor | None, vs: Tensor | None, hw=None) -> Tensor:
        k, v = cat_support(k, v, ks, vs)
        return F.scaled_dot_product_attention(q, k, v)
