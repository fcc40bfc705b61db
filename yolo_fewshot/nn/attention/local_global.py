"""Local-global attention: windowed attention plus a few learned global tokens and the support tokens.

Beltagy et al., "Longformer", 2020 (arXiv:2004.05150) and Zaheer et al., "Big Bird", NeurIPS 2020: local windows with
global tokens; seed 002 ``LocalGlobalAttention``.

Each query attends to the keys of its own ``window x window`` tile, to G global tokens and to the support tokens.
A global token is a learned query that first pools all tokens (O(L G)); its learned query doubles as its key and the
pooled result as its value, so the global tokens carry image-wide context into every window. With ``num_global=0`` and a
window covering the whole map this is exactly softmax attention (tested). Cost O(L (window^2 + G + M)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import SupportAttention, cat_support, resolve_hw


class LocalGlobalAttention(SupportAttention):
    """Windowed attention with global summary tokens.

    Args:
        dim: Token width C.
        num_heads: Number of heads.
        window: Side of the square attention window (clipped to the map size).
        num_global: Number of learned global tokens G.
    """

    name = "local_global"

    def __init__(
        self, dim: int, num_heads: int = 4, qkv_bias: bool = True, window: int = 8, num_global: int = 4
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias)
        self.window, self.num_global = window, num_global
        self.global_q = (
            nn.Parameter(torch.randn(num_heads, num_global, self.head_dim) * self.head_dim**-0.5)
            if num_global
            else None
        )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ks: Tensor | None, vs: Tensor | None, hw=None) -> Tensor:
        bsz, nh, length, d = q.shape
        h, w = resolve_hw(hw, length)
        extra_k, extra_v = q.new_zeros(bsz, nh, 0, d), q.new_zeros(bsz, nh, 0, d)
        if self.num_global:
            gq = self.global_q.expand(bsz, -1, -1, -1)
            ak, av = cat_support(k, v, ks, vs)
            extra_k, extra_v = gq, F.scaled_dot_product_attention(gq, ak, av)  # [B', h, G, d]
        extra_k, extra_v = cat_support(extra_k, extra_v, ks, vs)

        wh, ww = min(self.window, h), min(self.window, w)
        ph, pw = -h % wh, -w % ww
        grid = lambda t: F.pad(t.unflatten(-2, (h, w)), (0, 0, 0, pw, 0, ph))  # noqa: E731  [B', h, H', W', d]
        hp, wp = h + ph, w + pw
        tiles = lambda t: (  # noqa: E731  [B', h, nT, wh*ww, d]
            t.unflatten(-3, (hp // wh, wh)).unflatten(-2, (wp // ww, ww)).permute(0, 1, 2, 4, 3, 5, 6).flatten(-3, -2)
        ).flatten(2, 3)
        qt, kt, vt = tiles(grid(q)), tiles(grid(k)), tiles(grid(v))
        n_tiles = qt.shape[2]
        ek = extra_k.unsqueeze(2).expand(-1, -1, n_tiles, -1, -1)
        ev = extra_v.unsqueeze(2).expand(-1, -1, n_tiles, -1, -1)
        kt, vt = torch.cat([kt, ek], -2), torch.cat([vt, ev], -2)
        mask = None
        if ph or pw:  # padded keys must not receive attention
            valid = torch.zeros(hp, wp, dtype=torch.bool, device=q.device)
            valid[:h, :w] = True
            valid = tiles(valid[None, None, :, :, None]).squeeze(-1)[0, 0]  # [nT, wh*ww]
            valid = torch.cat([valid, valid.new_ones(n_tiles, ek.shape[-2])], -1)
            mask = valid[:, None, :]  # [nT, 1, S] broadcast over batch, heads and queries
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)  # [B', h, nT, wh*ww, d]
        o = o.unflatten(2, (hp // wh, wp // ww)).unflatten(-2, (wh, ww)).permute(0, 1, 2, 4, 3, 5, 6)
        return o.reshape(bsz, nh, hp, wp, d)[:, :, :h, :w].flatten(2, 3)
