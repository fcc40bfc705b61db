"""Top-down + bottom-up feature pyramids of the two necks.

* :class:`CrossScalePyramid` (CHEAF, seed 000; after Lin et al. "FPN", CVPR 2017 and Liu et al. "PANet", CVPR 2018):
  dense 1x1 / strided 3x3 level adapters, a channel-spatial gate on every merge, depthwise-separable fusion, residual.
* :class:`LightPyramid` (PSALM, seed 001): the same two passes with grouped 1x1 channel adapters and depthwise 3x3 convs
  only, no gates; it runs *before* the attention, once per image, so every reference class reuses it.

Both resize with the target's exact size (not a fixed x2), so odd feature sizes work.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn
from ultralytics.nn.modules.conv import Conv

from .conv import DWSeparableConv, match_size
from .gate import ChannelSpatialGate


def _up(x: Tensor, ref: Tensor) -> Tensor:
    return F.interpolate(x, size=ref.shape[-2:], mode="nearest")


class CrossScalePyramid(nn.Module):
    """CHEAF's gated top-down / bottom-up refinement with a residual per level.

    Args:
        channels: Channels per level, finest first.
    """

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        n = len(channels)
        self.td = nn.ModuleList(Conv(channels[i + 1], channels[i], 1, act=False) for i in range(n - 1))
        self.bu = nn.ModuleList(Conv(channels[i], channels[i + 1], 3, 2, act=False) for i in range(n - 1))
        self.td_gates = nn.ModuleList(ChannelSpatialGate(c) for c in channels[:-1])
        self.bu_gates = nn.ModuleList(ChannelSpatialGate(c) for c in channels[1:])
        self.fuse = nn.ModuleList(DWSeparableConv(c, c) for c in channels)

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        """Levels ``[B, c_i, H_i, W_i]`` -> same shapes."""
        td = [x[-1]]
        for i in range(len(x) - 2, -1, -1):
            td.insert(0, self.td_gates[i](x[i]) + _up(self.td[i](td[0]), x[i]))
        bu = [td[0]]
        for i in range(1, len(x)):
            bu.append(self.bu_gates[i - 1](td[i]) + match_size(self.bu[i - 1](bu[-1]), td[i]))
        return [f(b) + xi for f, b, xi in zip(self.fuse, bu, x)]


class LightPyramid(nn.Module):
    """PSALM's depthwise-only enrichment: grouped 1x1 channel adapters, depthwise 3x3 mixing, no gates, no residual.

    Args:
        channels: Channels per level, finest first.
    """

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        n = len(channels)
        g = [math.gcd(channels[i], channels[i + 1]) for i in range(n - 1)]
        self.td = nn.ModuleList(Conv(channels[i + 1], channels[i], 1, g=g[i], act=False) for i in range(n - 1))
        self.td_mix = nn.ModuleList(Conv(c, c, 3, g=c) for c in channels[:-1])
        self.down = nn.ModuleList(Conv(c, c, 3, 2, g=c, act=False) for c in channels[:-1])
        self.bu = nn.ModuleList(Conv(channels[i], channels[i + 1], 1, g=g[i], act=False) for i in range(n - 1))
        self.bu_mix = nn.ModuleList(Conv(c, c, 3, g=c) for c in channels[1:])

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        """Levels ``[B, c_i, H_i, W_i]`` -> same shapes."""
        td = [x[-1]]
        for i in range(len(x) - 2, -1, -1):
            td.insert(0, self.td_mix[i](x[i] + _up(self.td[i](td[0]), x[i])))
        bu = [td[0]]
        for i in range(1, len(x)):
            bu.append(self.bu_mix[i - 1](td[i] + match_size(self.bu[i - 1](self.down[i - 1](bu[-1])), td[i])))
        return bu
