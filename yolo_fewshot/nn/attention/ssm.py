"""Mamba-style selective state-space model over the token sequence, with the support tokens as a prefix.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023 (arXiv:2312.00752); bidirectional
scan for images as in Zhu et al., "Vision Mamba", ICML 2024. Seed 002 ``MambaLayer``.

h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,  y_t = C_t h_t + D x_t, with input-dependent dt, B, C (the selection) and a
diagonal negative A. The support tokens are prepended to the sequence, so the state that scans the image starts from
the reference. The selection (dt, B, C) is computed from ``x_qk`` when given (PSALM's conv-preprocessed stream) and the
scanned values from ``x``. :func:`selective_scan` is chunked: within a chunk of T tokens the decays are formed from
differences of cumulative log-decays (all <= 0, so ``exp`` never overflows) and the state is carried across chunks;
:func:`selective_scan_reference` is the token-by-token recurrence the tests compare it with. O(L) in tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import SupportAttention


def selective_scan_reference(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Token-by-token recurrence.

    Args:
        x: Inputs ``[B, T, D]``.
        dt: Positive step sizes ``[B, T, D]``.
        a: Negative diagonal state matrix ``[D, S]``.
        b: Input projections ``[B, T, S]``.
        c: Output projections ``[B, T, S]``.

    Returns:
        ``[B, T, D]``.
    """
    h = x.new_zeros(x.shape[0], x.shape[2], a.shape[1])
    ys = []
    for t in range(x.shape[1]):
        h = (dt[:, t, :, None] * a).exp() * h + (dt[:, t] * x[:, t])[..., None] * b[:, t, None, :]
        ys.append((h * c[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1)


def selective_scan(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, chunk: int = 32) -> Tensor:
    """Chunked selective scan, equal to :func:`selective_scan_reference` (same arguments and result)."""
    bsz, length, dim = x.shape
    h = x.new_zeros(bsz, dim, a.shape[1])
    ys = []
    for i in range(0, length, chunk):
        xs, dts, bs, cs = x[:, i : i + chunk], dt[:, i : i + chunk], b[:, i : i + chunk], c[:, i : i + chunk]
        t = xs.shape[1]
        logd = torch.cumsum(dts[..., None] * a, 1)  # [B, t, D, S] cumulative log decay, decreasing
        seg = logd[:, :, None] - logd[:, None, :]  # [B, t(out), t(in), D, S], <= 0 on and below the diagonal
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, :, :, None, None]
        decay = seg.masked_fill(~causal, float("-inf")).exp()
        u = (dts * xs)[..., None] * bs[:, :, None, :]  # [B, t, D, S]
        hs = (decay * u[:, None]).sum(2) + logd.exp() * h[:, None]  # states after every token of the chunk
        ys.append((hs * cs[:, :, None, :]).sum(-1))
        h = hs[:, -1]
    return torch.cat(ys, 1)


class SelectiveSSM(SupportAttention):
    """Bidirectional Mamba-style selective scan with a support prefix (same interface as the attention kernels).

    Args:
        dim: Token width C.
        num_heads: Unused by the scan; kept for the common interface.
        state: State size S per channel.
        dt_rank: Rank of the dt projection (default ceil(C / 16)).
        conv: Kernel of the causal depthwise convolution before the scan.
    """

    name = "ssm"

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        qkv_bias: bool = True,
        state: int = 8,
        dt_rank: int | None = None,
        conv: int = 4,
        chunk: int = 32,
    ) -> None:
        nn.Module.__init__(self)  # the q/k/v projections of the base class do not apply
        self.dim, self.num_heads, self.head_dim, self.state, self.chunk = dim, 1, dim, state, chunk
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # scanned stream and output gate
        self.conv = nn.Conv1d(dim, dim, conv, groups=dim, padding=conv - 1)
        self.sel_proj = nn.Linear(dim, self.dt_rank + 2 * state, bias=False)  # selection: dt, B, C
        self.dt_proj = nn.Linear(self.dt_rank, dim)
        with torch.no_grad():  # dt initialised in [1e-3, 1e-1] as in Mamba
            dt0 = torch.exp(torch.rand(dim) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt0 + torch.log(-torch.expm1(-dt0)))
        self.a_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(dim, 1))
        self.d = nn.Parameter(torch.ones(dim))
        self.proj = nn.Linear(dim, dim)

    def scan(self, seq: Tensor, sel: Tensor, reference: bool = False) -> Tensor:
        """One direction: ``seq``/``sel`` ``[B, T, C]`` -> ``[B, T, C]``."""
        u = self.conv(seq.transpose(1, 2))[..., : seq.shape[1]].transpose(1, 2)
        u = F.silu(u)
        dt, b, c = self.sel_proj(sel).split([self.dt_rank, self.state, self.state], -1)
        dt = F.softplus(self.dt_proj(dt))
        a = -self.a_log.exp()
        fn = selective_scan_reference if reference else selective_scan
        y = fn(u, dt, a, b, c) if reference else fn(u, dt, a, b, c, self.chunk)
        return y + u * self.d

    def forward(
        self,
        x: Tensor,
        support: Tensor | None = None,
        hw: tuple[int, int] | None = None,
        x_qk: Tensor | None = None,
        gate: Tensor | None = None,
        reference: bool = False,
    ) -> Tensor:
        """See :meth:`SupportAttention.forward`; ``reference=True`` runs the token-by-token scan."""
        xs, z = self.in_proj(x).chunk(2, -1)  # [B, L, C] each
        sel = xs if x_qk is None else x_qk
        if support is not None:
            b, n = x.shape[0], support.shape[1]
            s = self.flatten_support(support, b)  # [B*N, M, C]
            sv, _ = self.in_proj(s).chunk(2, -1)
            xs, z, sel = (self.expand_classes(t, n) for t in (xs, z, sel))
        else:
            sv = s = xs.new_zeros(xs.shape[0], 0, xs.shape[2])
        m = sv.shape[1]
        fwd = self.scan(torch.cat([sv, xs], 1), torch.cat([s, sel], 1), reference)[:, m:]
        bwd = self.scan(torch.cat([sv, xs.flip(1)], 1), torch.cat([s, sel.flip(1)], 1), reference)[:, m:].flip(1)
        y = (fwd + bwd) * F.silu(z)
        if gate is not None:
            y = y * gate.unsqueeze(-2)
        return self.proj(y)
