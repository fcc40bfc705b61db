"""Small convolution blocks shared by the necks, built from Ultralytics' ``Conv`` so that ``fuse()`` folds their BN."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from ultralytics.nn.modules.conv import Conv


class DWSeparableConv(nn.Module):
    """Depthwise-separable convolution: depthwise k x k (+BN) then pointwise 1 x 1 (+BN+SiLU).

    Howard et al., "MobileNets", 2017 (arXiv:1704.04861). ~k^2/c2 + 1/c1 of a dense conv's parameters.

    Args:
        c1: Input channels.
        c2: Output channels.
        k: Depthwise kernel size.
        act: Whether the pointwise conv ends with SiLU.
    """

    def __init__(self, c1: int, c2: int, k: int = 3, act: bool = True) -> None:
        super().__init__()
        self.dw = Conv(c1, c1, k, g=c1, act=False)
        self.pw = Conv(c1, c2, 1, act=act)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, c1, H, W]`` -> ``[B, c2, H, W]``."""
        return self.pw(self.dw(x))


class ChannelRepeat(nn.Module):
    """Parameter-free widening shortcut: repeat the input channels ``c2 // c1`` times (He et al. 2016, option A style).

    Args:
        c1: Input channels.
        c2: Output channels, a multiple of ``c1``.
    """

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        if c2 % c1:
            raise ValueError(
                f"residual='repeat' needs output channels that are multiples of the input's, got {c1}->{c2};"
                " use residual='conv'"
            )
        self.times = c2 // c1

    def forward(self, x: Tensor) -> Tensor:
        """``[B, c1, H, W]`` -> ``[B, c2, H, W]``."""
        return x.repeat(1, self.times, 1, 1)


def expand_classes(x: Tensor, n: int | None) -> Tensor:
    """Repeat a per-image map ``[B, ...]`` once per reference class -> ``[B*N, ...]`` (image-major); None: unchanged."""
    return x if n is None else x.unsqueeze(1).expand(-1, n, *x.shape[1:]).flatten(0, 1)


def match_size(x: Tensor, ref: Tensor) -> Tensor:
    """Resize ``x`` to ``ref``'s spatial size if they differ (odd sizes after striding); nearest, no parameters."""
    return x if x.shape[-2:] == ref.shape[-2:] else F.interpolate(x, size=ref.shape[-2:], mode="nearest")
