"""Common interface of the attention kernels that fuse query tokens with a few support tokens.

Every kernel in this package answers the same question: given the tokens of one feature map (``x``, shape
``[B, L, C]``) and, per reference class, a small set of support tokens (``support``, shape ``[B|1, N, M, C]``), return
new tokens for every (image, class) pair, shape ``[B*N, L, C]`` (image-major: row ``b*N + n``). Without support the
kernel is plain self-attention of ``x`` and returns ``[B, L, C]`` (the bypass mode that Ultralytics' stride probe,
FLOPs count and ``fuse()`` rely on).

The projections of ``x`` do not depend on the class, so they are computed once per image; only the attention itself is
evaluated per (image, class). Kernels implement :meth:`SupportAttention.attend` (the reference path, on explicitly
expanded tensors); a kernel may override :meth:`SupportAttention.forward` with a fast path that shares more work across
classes, which the tests check against the reference path.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn


class SupportAttention(nn.Module):
    """Base class: multi-head attention of query tokens over themselves plus per-class support tokens.

    Args:
        dim: Token width C.
        num_heads: Number of heads; must divide ``dim``.
        qkv_bias: Whether the Q/K/V projections have a bias.
    """

    name: ClassVar[str] = ""

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(
                f"attention width {dim} is not divisible by num_heads={num_heads}; pick a divisor of {dim}"
            )
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    # -- layout helpers ------------------------------------------------------------------------------------------------
    def heads(self, t: Tensor) -> Tensor:
        """``[..., L, C]`` -> ``[..., h, L, d]``."""
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    @staticmethod
    def merge(t: Tensor) -> Tensor:
        """``[..., h, L, d]`` -> ``[..., L, h*d]``."""
        return t.transpose(-3, -2).flatten(-2)

    @staticmethod
    def expand_classes(t: Tensor, n: int) -> Tensor:
        """Repeat per-image tensor ``[B, ...]`` once per class -> ``[B*N, ...]`` (image-major)."""
        return t.unsqueeze(1).expand(t.shape[0], n, *t.shape[1:]).flatten(0, 1)

    @staticmethod
    def flatten_support(s: Tensor, b: int) -> Tensor:
        """Support ``[B|1, N, M, C]`` -> ``[B*N, M, C]`` matching :meth:`expand_classes`."""
        return s.expand(b, *s.shape[1:]).flatten(0, 1)

    def output(self, o: Tensor, gate: Tensor | None) -> Tensor:
        """Merge heads, apply the optional per-channel gate ``[B', C]`` and the output projection."""
        o = self.merge(o)
        if gate is not None:
            o = o * gate.unsqueeze(-2)
        return self.proj(o)

    # -- the two paths -------------------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        support: Tensor | None = None,
        hw: tuple[int, int] | None = None,
        x_qk: Tensor | None = None,
        gate: Tensor | None = None,
    ) -> Tensor:
        """Attend query tokens over themselves and the support tokens.

        Args:
            x: Query tokens ``[B, L, C]``; also the source of the values.
            support: Support tokens ``[B|1, N, M, C]`` (N classes, M tokens each) or None (bypass: self-attention).
            hw: Spatial size (H, W) with H*W == L, for kernels with a 2-D notion of locality.
            x_qk: Optional separate source ``[B, L, C]`` for queries and keys (PSALM's conv-preprocessed Q/K).
            gate: Optional per-channel modulation ``[B*N, C]`` (or ``[B, C]`` in bypass) applied before the projection.

        Returns:
            ``[B*N, L, C]`` with support, else ``[B, L, C]``.
        """
        xq = x if x_qk is None else x_qk
        q, k, v = self.heads(self.q(xq)), self.heads(self.k(xq)), self.heads(self.v(x))
        if support is None:
            return self.output(self.attend(q, k, v, None, None, hw), gate)
        b, n = x.shape[0], support.shape[1]
        s = self.flatten_support(support, b)
        ks, vs = self.heads(self.k(s)), self.heads(self.v(s))
        q, k, v = (self.expand_classes(t, n) for t in (q, k, v))
        return self.output(self.attend(q, k, v, ks, vs, hw), gate)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, ks: Tensor | None, vs: Tensor | None, hw: tuple[int, int] | None
    ) -> Tensor:
        """The kernel: ``q, k, v`` ``[B', h, L, d]``; ``ks, vs`` ``[B', h, M, d]`` or None -> ``[B', h, L, d]``."""
        raise NotImplementedError


def cat_support(k: Tensor, v: Tensor, ks: Tensor | None, vs: Tensor | None) -> tuple[Tensor, Tensor]:
    """Append the support keys/values to the query keys/values along the token axis."""
    if ks is None:
        return k, v
    return torch.cat([k, ks], -2), torch.cat([v, vs], -2)


def resolve_hw(hw: tuple[int, int] | None, length: int) -> tuple[int, int]:
    """Spatial size of a token sequence; a sequence without one is treated as a single row."""
    if hw is None:
        return 1, length
    if hw[0] * hw[1] != length:
        raise ValueError(f"hw={tuple(hw)} does not match {length} tokens")
    return int(hw[0]), int(hw[1])
