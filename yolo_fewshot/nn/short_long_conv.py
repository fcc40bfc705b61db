"""Short-long convolution: parallel depthwise 3x3 (short) and 7x7 (long) kernels fused by a pointwise conv.

Liu et al., "Short-Long Convolutions Help Hardware-Efficient Linear Attention to Focus on Long Sequences" (CHELA),
ICML 2024 (arXiv:2406.08128); seed 000 ``ShortLongConvModule``. Gives linear attention the local inductive bias it
lacks: CHEAF runs it beside the attention, PSALM uses it to pre-process the attention's queries and keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from ultralytics.nn.modules.conv import Conv


class ShortLongConv(nn.Module):
    """Depthwise short and long kernels in parallel, concatenated and fused pointwise.

    Args:
        c: Channels (in and out).
        short: Short kernel size.
        long: Long kernel size.
    """

    def __init__(self, c: int, short: int = 3, long: int = 7) -> None:
        super().__init__()
        self.short = Conv(c, c, short, g=c)  # depthwise + BN + SiLU
        self.long = Conv(c, c, long, g=c)
        self.fuse = Conv(2 * c, c, 1, act=False)  # pointwise + BN

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, C, H, W]``."""
        return self.fuse(torch.cat([self.short(x), self.long(x)], 1))
