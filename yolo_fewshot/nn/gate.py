"""Channel-spatial gate: squeeze-and-excitation channel weights followed by a 1-channel spatial mask.

Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018; Woo et al., "CBAM", ECCV 2018; seed 000 ``ChannelSpatialGate``.
Used by CHEAF's cross-scale pyramid (PSALM deliberately has none).
"""

from __future__ import annotations

from torch import Tensor, nn
from ultralytics.nn.modules.conv import Conv


class ChannelSpatialGate(nn.Module):
    """x * sigmoid(channel(x)), then * sigmoid(spatial(.)).

    Args:
        c: Channels.
        reduction: Hidden width divisor (hidden = max(c // reduction, 4)).
    """

    def __init__(self, c: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(c // reduction, 4)
        self.channel = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(c, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c, 1),
            nn.Sigmoid(),
        )
        self.spatial = nn.Sequential(Conv(c, hidden, 1, act=nn.ReLU()), nn.Conv2d(hidden, 1, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, C, H, W]``."""
        x = x * self.channel(x)
        return x * self.spatial(x)
