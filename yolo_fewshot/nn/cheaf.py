"""CHEAF: Cross-scale Hybrid Efficient Attention Fusion (seed 000).

Per level, a hybrid of linear attention between the query map and the support tokens and a parallel short-long
convolution branch, fused pointwise with a residual; then a gated cross-scale top-down/bottom-up pyramid; then a
depthwise-separable output projection plus a projected residual of the original input.

Fixes over the seed: the support projectors are used (prototypes reach each level at its own width); attention is the
properly normalised efficient attention with the support as a few extra tokens (not N copies); separate gates for the
two pyramid passes; sizes matched exactly instead of a fixed x2 upsample; without prototypes the module still runs its
whole path with self-attention only (the seed's bypass skipped stages 1–2, so a bypass model never trained them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from ultralytics.nn.modules.conv import Conv

from .conv import expand_classes
from .fusion_neck import FusionNeck
from .pyramid import CrossScalePyramid
from .short_long_conv import ShortLongConv


class CHEAF(FusionNeck):
    """Cross-scale hybrid efficient attention fusion.

    Args:
        c_in: Input channels per level, finest first.
        c_out: Output channels per level.
        proto_dims: Prototype width per level.
        attn: Attention kernel name (see ``yolo_fewshot.nn.attention.ATTENTIONS``).
        heads: Attention heads (lowered to a divisor of each level's width).
        pyramid: Whether to run the cross-scale pyramid (stage 2).
        short_long: Whether to run the short-long convolution branch beside the attention.
        residual: Input shortcut to the output width, ``conv`` or ``repeat`` (see ``FusionNeck``).
        **attn_kwargs: Kernel options (e.g. ``stride=2`` for strided).
    """

    def __init__(
        self,
        c_in: list[int],
        c_out: list[int],
        proto_dims: int | list[int],
        attn: str = "linear",
        heads: int = 4,
        pyramid: bool = True,
        short_long: bool = True,
        residual: str = "conv",
        **attn_kwargs,
    ) -> None:
        super().__init__(c_in, c_out, proto_dims, attn, heads, residual, **attn_kwargs)
        self.short_long = nn.ModuleList(ShortLongConv(c) for c in c_in) if short_long else None
        self.branch_fuse = nn.ModuleList(Conv(c * (2 if short_long else 1), c, 1) for c in c_in)
        self.pyramid = CrossScalePyramid(c_in) if pyramid else None

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        """``[B, c_in_i, H_i, W_i]`` per level -> ``[B*N, c_out_i, H_i, W_i]`` (``[B, ...]`` without prototypes)."""
        n = self.num_classes
        stage1 = []
        for i, xi in enumerate(x):
            b, c, h, w = xi.shape
            a = self.attn[i](xi.flatten(2).transpose(1, 2), self.support_tokens(i), (h, w))  # [B', L, C]
            a = a.transpose(1, 2).reshape(-1, c, h, w)
            branches = [a] if self.short_long is None else [a, expand_classes(self.short_long[i](xi), n)]
            stage1.append(self.branch_fuse[i](torch.cat(branches, 1)) + expand_classes(xi, n))
        stage2 = stage1 if self.pyramid is None else self.pyramid(stage1)
        return [p(s) + expand_classes(r(xi), n) for p, r, s, xi in zip(self.out_proj, self.res_proj, stage2, x)]
