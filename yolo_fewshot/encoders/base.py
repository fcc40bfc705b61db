"""The support-encoder interface: reference crops -> per-level prototype tokens.

An encoder takes crops ``[K, 3, S, S]`` in [0, 1] (RGB, aspect-preserved and padded by
:mod:`yolo_fewshot.references.crops`) with a mask ``[K, 1, S, S]`` of the object's pixels, and returns one tensor per
pyramid level (finest first), ``[K, M, D_l]``: M tokens per crop (e.g. a masked mean; CLS + masked patch mean for ViTs).
Its :class:`EncoderSpec` — name, revision, dims, tokens, input size — is what checkpoints and reference banks store
instead of the encoder itself, so a bank made by one encoder is never fed to a model built for another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class EncoderSpec:
    """What identifies an encoder's output space."""

    name: str
    dims: tuple[int, ...]
    tokens: int = 1
    input_size: int = 224
    revision: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dims"] = list(self.dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EncoderSpec:
        return cls(
            d["name"],
            tuple(int(x) for x in d["dims"]),
            int(d.get("tokens", 1)),
            int(d.get("input_size", 224)),
            str(d.get("revision", "")),
        )

    def compatible(self, other: EncoderSpec) -> bool:
        """Same output space: name, revision, dims and tokens agree (the input size may differ)."""
        return (self.name, self.revision, self.dims, self.tokens) == (
            other.name,
            other.revision,
            other.dims,
            other.tokens,
        )


class SupportEncoder(nn.Module):
    """Base class of the support encoders. Frozen (pretrained) ones live outside the detector and are never part of a
    checkpoint; ``trainable`` ones (no pretrained weights) become a detector submodule, learned and saved with it."""

    spec: EncoderSpec
    trainable: bool = False

    def forward(self, crops: Tensor, masks: Tensor | None = None) -> list[Tensor]:
        """``[K, 3, S, S]`` crops in [0, 1] (+ ``[K, 1, S, S]`` masks) -> per level ``[K, M, D_l]``."""
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, crops: Tensor, masks: Tensor | None = None, batch: int = 32) -> list[Tensor]:
        """Inference in chunks of ``batch`` crops, on the encoder's device; returns CPU float tensors."""
        dev = next(self.parameters()).device
        outs = [
            self(crops[i : i + batch].to(dev), None if masks is None else masks[i : i + batch].to(dev))
            for i in range(0, len(crops), batch)
        ]
        return [torch.cat([o[level] for o in outs]).float().cpu() for level in range(len(outs[0]))]


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Object mask ``[K, 1, H, W]`` -> ``[K, 1, *size]``: the share of object pixels in each cell (area averaging).

    Sizes are fixed per encoder, so they are taken as constants: the average pool (exactly area interpolation when the
    sizes divide) and the bilinear fallback both export to ONNX, where adaptive pooling does not."""
    h, w = int(size[0]), int(size[1])
    big_h, big_w = int(mask.shape[-2]), int(mask.shape[-1])
    if big_h % h == 0 and big_w % w == 0:
        return F.avg_pool2d(mask.float(), (big_h // h, big_w // w))
    return F.interpolate(mask.float(), size=(h, w), mode="bilinear", align_corners=False)


def masked_mean(feat: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of a map ``[K, C, H, W]`` over the mask's pixels (resized to the map; all pixels if none) -> ``[K, C]``."""
    if mask is None:
        return feat.mean((2, 3))
    m = resize_mask(mask, feat.shape[-2:])
    return (feat * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1e-6)
