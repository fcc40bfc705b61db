"""Cross-memory attention: queries read only from a small memory, the support tokens plus learned memory slots.

Seed 002 ``CrossMemoryAttention`` (cross-attention from local features to memory tokens); the memory-slot idea follows
Burtsev et al., "Memory Transformer", 2020 (arXiv:2006.11527).

No query-to-query term, so the cost is O(L (M + S)) for M support tokens and S slots: the cheapest kernel, and the
purest "match the reference" operator. Without support (bypass) the queries read the learned slots alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import SupportAttention


class CrossMemoryAttention(SupportAttention):
    """Attention from query tokens to [support tokens; learned memory slots].

    Args:
        dim: Token width C.
        num_heads: Number of heads.
        num_slots: Number of learned memory slots S (at least 1, so bypass mode is defined).
    """

    name = "cross_memory"

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = True, num_slots: int = 4) -> None:
        super().__init__(dim, num_heads, qkv_bias)
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.slot_k = nn.Parameter(torch.randn(num_heads, num_slots, self.head_dim) * self.head_dim**-0.5)
        self.slot_v = nn.Parameter(torch.zeros(num_heads, num_slots, self.head_dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ks: Tensor | None, vs: Tensor | None, hw=None) -> Tensor:
        mk, mv = self.slot_k.expand(q.shape[0], -1, -1, -1), self.slot_v.expand(q.shape[0], -1, -1, -1)
        if ks is not None:
            mk, mv = torch.cat([ks, mk], -2), torch.cat([vs, mv], -2)
        return F.scaled_dot_product_attention(q, mk, mv)
