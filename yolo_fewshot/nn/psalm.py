"""PSALM: Pyramid-guided Scale-Adaptive Linear attention with Modulated support (seed 001).

"Enrich first, match second, refine last":

1. pyramid enrichment first — a light top-down + bottom-up pass (grouped 1x1 adapters, depthwise 3x3, no gates);
2. per level, linear attention whose queries and keys come from a short-long-convolution pre-processing of the
   enriched map (values from the enriched map itself), with the support as extra tokens and support modulation:
   the attention output channels are scaled by ``sigmoid(W . prototype)`` before the output projection;
3. a depthwise-separable refinement.

Only two residuals: enriched map -> attention output, original input -> final output. Stage 1 and the Q/K
pre-processing do not depend on the reference, so they run once per image however many classes are searched.

``W . prototype`` is realised as a per-channel affine of the projected support token (``W = diag(gamma) P`` with the
support projection ``P`` shared with the attention): a separate dense ``D x C`` matrix per level would double the
prototype-side parameters for no modelling gain we could measure.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .conv import expand_classes
from .fusion_neck import FusionNeck
from .pyramid import LightPyramid
from .short_long_conv import ShortLongConv


class PSALM(FusionNeck):
    """Pyramid-first modulated linear-attention fusion.

    Args:
        c_in: Input channels per level, finest first.
        c_out: Output channels per level.
        proto_dims: Prototype width per level.
        attn: Attention kernel name (see ``yolo_fewshot.nn.attention.ATTENTIONS``).
        heads: Attention heads (lowered to a divisor of each level's width).
        pyramid: Whether to run the pyramid enrichment (stage 1).
        conv_qk: Whether queries/keys are pre-processed by a short-long convolution.
        residual: Input shortcut to the output width, ``conv`` or ``repeat`` (see ``FusionNeck``).
        **attn_kwargs: Kernel options.
    """

    def __init__(
        self,
        c_in: list[int],
        c_out: list[int],
        proto_dims: int | list[int],
        attn: str = "linear",
        heads: int = 4,
        pyramid: bool = True,
        conv_qk: bool = True,
        residual: str = "conv",
        **attn_kwargs,
    ) -> None:
        super().__init__(c_in, c_out, proto_dims, attn, heads, residual, **attn_kwargs)
        self.pyramid = LightPyramid(c_in) if pyramid else None
        self.qk_conv = nn.ModuleList(ShortLongConv(c) for c in c_in) if conv_qk else None
        self.mod_scale = nn.ParameterList(nn.Parameter(torch.ones(c)) for c in c_in)
        self.mod_bias = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in c_in)

    def modulation(self, i: int, tokens: Tensor | None, batch: int) -> Tensor | None:
        """Per-(image, class) channel weights ``[B*N, C]`` = sigmoid(gamma * mean_M(tokens) + beta), or None."""
        if tokens is None:
            return None
        g = torch.sigmoid(tokens.mean(2) * self.mod_scale[i] + self.mod_bias[i])  # [B|1, N, C]
        return g.expand(batch, *g.shape[1:]).flatten(0, 1)

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        """``[B, c_in_i, H_i, W_i]`` per level -> ``[B*N, c_out_i, H_i, W_i]`` (``[B, ...]`` without prototypes)."""
        n = self.num_classes
        enriched = x if self.pyramid is None else self.pyramid(x)
        out = []
        for i, (xi, ei) in enumerate(zip(x, enriched)):
            b, c, h, w = ei.shape
            tok = ei.flatten(2).transpose(1, 2)
            qk = None if self.qk_conv is None else self.qk_conv[i](ei).flatten(2).transpose(1, 2)
            s = self.support_tokens(i)
            a = self.attn[i](tok, s, (h, w), x_qk=qk, gate=self.modulation(i, s, b))  # [B', L, C]
            a = a.transpose(1, 2).reshape(-1, c, h, w) + expand_classes(ei, n)  # residual 1: enriched
            out.append(self.out_proj[i](a) + expand_classes(self.res_proj[i](xi), n))  # residual 2: original input
        return out
