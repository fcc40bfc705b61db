"""TensorFlow-compatible layers: ``SAME`` padding, legacy bilinear resize, hard-swish / hard-sigmoid constants.

Source: TensorFlow's op semantics (``tf.nn.conv2d`` padding ``SAME``, ``tf.image.resize_bilinear`` with
``align_corners=False, half_pixel_centers=False``, the ``hard_swish`` of ``tf_slim`` MobileNetV3), which a port of a
TF graph has to reproduce exactly:

- ``SAME`` with stride 2 pads **asymmetrically** (the extra row/column goes at the bottom/right), unlike torch's
  symmetric ``padding=k//2``; at stride 1 with an odd kernel the two agree.
- The legacy resize samples source pixel ``dst * in / out`` (no half-pixel shift), unlike torch's
  ``interpolate(align_corners=False)``, which samples ``(dst + 0.5) * in / out - 0.5``.
- A converted graph keeps its constants as stored (the fp16 graph stores ``1/6`` as ``0.1666259765625``); the
  activations take them as arguments so the port computes what the graph computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``SAME`` padding of one spatial dimension.

    Args:
        size: Input length along the dimension.
        kernel: Kernel length.
        stride: Stride.

    Returns:
        ``(before, after)`` with ``before + after = max((ceil(size / stride) - 1) * stride + kernel - size, 0)``; the
        odd pixel goes after.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``SAME`` padding (asymmetric at stride > 1), dilation 1.

    Args:
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``.
        kernel_size: Square kernel size ``k``.
        stride: Stride ``s``.
        groups: ``in_channels`` for a depthwise convolution (channel multiplier ``out_channels / in_channels``).
        bias: Whether the layer has a bias (BatchNorm folded into it by the converter).

    Shapes:
        ``[B, C_in, H, W]`` -> ``[B, C_out, ceil(H / s), ceil(W / s)]``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1, bias: bool = True
    ) -> None:
        symmetric = stride == 1 and kernel_size % 2 == 1
        pad = kernel_size // 2 if symmetric else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, pad, groups=groups, bias=bias)
        self.dynamic_pad = not symmetric

    def forward(self, x: Tensor) -> Tensor:
        """Convolve ``x`` ``[B, C_in, H, W]`` -> ``[B, C_out, H', W']``."""
        if self.dynamic_pad:
            k, s = self.kernel_size[0], self.stride[0]
            top, bottom = same_padding(x.shape[-2], k, s)
            left, right = same_padding(x.shape[-1], k, s)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class HardSwish(nn.Module):
    """``x * scale * relu6(x + offset)`` with the graph's own constants (``scale`` ~ 1/6, ``offset`` = 3).

    Args:
        offset: The added constant.
        scale: The multiplied constant, as the graph stores it.

    Shapes:
        any -> same.
    """

    def __init__(self, offset: float, scale: float) -> None:
        super().__init__()
        self.offset, self.scale = float(offset), float(scale)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the activation elementwise (the graph's order: ``(x * scale) * relu6(x + offset)``)."""
        return (x * self.scale) * F.relu6(x + self.offset)


class HardSigmoid(nn.Module):
    """``scale * relu6(x + offset)``, the squeeze-excitation gate of MobileNetV3.

    Args:
        offset: The added constant.
        scale: The multiplied constant, as the graph stores it.

    Shapes:
        any -> same.
    """

    def __init__(self, offset: float, scale: float) -> None:
        super().__init__()
        self.offset, self.scale = float(offset), float(scale)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gate elementwise."""
        return self.scale * F.relu6(x + self.offset)


def resize_bilinear_legacy(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TensorFlow's ``ResizeBilinear`` with ``align_corners=False, half_pixel_centers=False``.

    Output pixel ``d`` samples input coordinate ``d * in / out``, interpolating between ``floor`` and ``floor + 1``
    (clamped at the last pixel); x first, then y, in TF's order.

    Args:
        x: ``[B, C, H, W]``.
        size: ``(H_out, W_out)``.

    Returns:
        ``[B, C, H_out, W_out]``.
    """

    def axis(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(n_out, device=x.device, dtype=torch.float32) * (n_in / n_out)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo.float()).to(x.dtype)

    h0, h1, fy = axis(x.shape[-2], size[0])
    w0, w1, fx = axis(x.shape[-1], size[1])
    left, right = x[..., w0], x[..., w1]
    cols = left + (right - left) * fx  # [B, C, H, W_out]: along x first, then y, as TF/TF.js do
    top, bottom = cols[..., h0, :], cols[..., h1, :]
    return top + (bottom - top) * fy[:, None]
