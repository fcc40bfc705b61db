"""Base class of the prototype-fusion necks (CHEAF, PSALM): YAML building, support projection, class expansion.

A fusion neck takes the P2–P5 (or P3–P5) maps ``[B, c_i, H_i, W_i]`` and returns one map per level for every
(image, reference class) pair, ``[B*N, c_out_i, H_i, W_i]`` (image-major), or ``[B, ...]`` without prototypes.
Everything that does not depend on the class is computed once per image and then repeated.

YAML row: ``[[from levels], 1, PSALM, [[c_out per level], attn, heads]]``; ``c_out`` is width-scaled like Ultralytics'
own channels and the prototype widths come from the model YAML's ``proto_dims`` (the encoder's).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn
from ultralytics.nn.modules.conv import Conv

from .attention import build_attention
from .conv import ChannelRepeat, DWSeparableConv
from .prototypes import PrototypeConsumer


def scale_channels(c: int, width: float, max_channels: float) -> int:
    """Ultralytics' width scaling of a nominal channel count: min(c, max_channels) * width, up to a multiple of 8."""
    return int(math.ceil(min(c, max_channels) * width / 8) * 8)


def level_dims(dims: int | list[int] | None, levels: int) -> list[int]:
    """``proto_dims`` from the YAML (one int for all levels or one per level) -> one int per level."""
    if dims is None:
        raise ValueError("the model YAML has no 'proto_dims' (the encoder's prototype width per level)")
    dims = [int(dims)] * levels if isinstance(dims, int) else [int(d) for d in dims]
    if len(dims) != levels:
        raise ValueError(f"proto_dims {dims} has {len(dims)} entries for {levels} fused levels")
    return dims


class FusionNeck(nn.Module, PrototypeConsumer):
    """Shared machinery of CHEAF and PSALM: support projection, per-level attention, output and residual projections.

    Args:
        c_in: Channels of the input levels, finest first (3 or 4 levels).
        c_out: Channels of the output levels.
        proto_dims: Prototype width per level (or one int for all).
        attn: Attention kernel name (see ``yolo_fewshot.nn.attention.ATTENTIONS``).
        heads: Attention heads (lowered to a divisor of each level's width).
        residual: Shortcut of the original input to the output width: ``conv`` (1x1 conv + BN, the seeds') or
            ``repeat`` (parameter-free channel repetition; needs c_out multiples of c_in).
        **attn_kwargs: Kernel options (e.g. ``stride=2`` for strided).
    """

    def __init__(
        self,
        c_in: list[int],
        c_out: list[int],
        proto_dims: int | list[int],
        attn: str = "linear",
        heads: int = 4,
        residual: str = "conv",
        **attn_kwargs,
    ) -> None:
        super().__init__()
        if len(c_in) not in (3, 4) or len(c_out) != len(c_in):
            raise ValueError(
                f"{type(self).__name__} fuses 3 (P3–P5) or 4 (P2–P5) levels; got inputs {c_in}, outputs {c_out}"
            )
        self.c_in, self.c_out = list(c_in), list(c_out)
        self.proto_dims = level_dims(proto_dims, len(c_in))
        # Fix of seed 000: prototypes are projected to each level's width (the seed defined, then ignored, these).
        self.support_proj = nn.ModuleList(
            nn.Sequential(nn.Linear(d, c), nn.LayerNorm(c)) for d, c in zip(self.proto_dims, self.c_in)
        )
        self.attn = nn.ModuleList(build_attention(attn, c, heads, **attn_kwargs) for c in c_in)
        # depthwise-separable output projection (PSALM's "refinement") and the residual of the original input
        self.out_proj = nn.ModuleList(DWSeparableConv(ci, co) for ci, co in zip(c_in, c_out))
        if residual not in ("conv", "repeat"):
            raise ValueError(f"residual must be 'conv' or 'repeat', got '{residual}'")
        shortcut = ChannelRepeat if residual == "repeat" else (lambda ci, co: Conv(ci, co, 1, act=False))
        self.res_proj = nn.ModuleList(nn.Identity() if ci == co else shortcut(ci, co) for ci, co in zip(c_in, c_out))

    @classmethod
    def yaml_build(cls, c_in: list[int], args: list[Any], ctx: dict[str, Any]) -> tuple[list[Any], list[int]]:
        """Constructor args and output channels from a YAML row (called by the parse_model hook in ``_register``)."""
        if not args or not isinstance(args[0], (list, tuple)):
            raise ValueError(f"{cls.__name__} YAML args must start with the output channels per level, got {args}")
        c_out = [scale_channels(c, ctx["width"], ctx["max_channels"]) for c in args[0]]
        dims = level_dims(ctx["cfg"].get("proto_dims"), len(c_in))
        return [list(c_in), c_out, dims, *args[1:]], c_out

    def support_tokens(self, i: int) -> Tensor | None:
        """Level ``i`` prototypes projected to the level width: ``[B|1, N, M, c_in_i]``, or None in bypass mode."""
        return None if self.prototypes is None else self.support_proj[i](self.prototypes[i])

    def extra_repr(self) -> str:
        return f"c_in={self.c_in}, c_out={self.c_out}, proto_dims={self.proto_dims}"
