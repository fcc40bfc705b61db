"""Hugging Face ``transformers`` support encoders: DINOv2 (with and without registers), DINOv3 ViT and ConvNeXt.

Oquab et al., "DINOv2", TMLR 2024; Darcet et al., "Vision Transformers Need Registers", ICLR 2024; Siméoni et al.,
"DINOv3", 2025. Loaded with ``AutoModel.from_pretrained`` from a hub id or a local directory (``hf:<id or dir>``,
optionally ``@revision``). DINOv2 is Apache-2.0; DINOv3 weights are gated under Meta's own licence.

Prototype levels (finest first): for ViTs, 4 evenly spaced layers (e.g. 3/6/9/12 of 12), each giving 2 tokens — the CLS
token and the mean of the patch tokens inside the object mask (registers skipped); for ConvNeXt, the 4 stages'
maps, masked-mean pooled (1 token). Offline, a hub id that is not in the local cache fails with one line naming the
offline alternatives instead of retrying for half a minute (set ``HF_HUB_OFFLINE=1`` to skip the network entirely).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from .base import EncoderSpec, SupportEncoder, masked_mean, resize_mask

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_hf_model(ref: str, revision: str | None = None):
    """``AutoModel.from_pretrained`` of a local directory or hub id, with a one-line error when it cannot be had."""
    from transformers import AutoModel

    kw = {"revision": revision} if revision else {}
    if Path(ref).is_dir():
        return AutoModel.from_pretrained(ref, **kw)
    try:  # the local cache first: no network, no retries
        return AutoModel.from_pretrained(ref, local_files_only=True, **kw)
    except OSError:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hint = (
        f"cannot load '{ref}' from the Hugging Face hub (offline, or no such model); use a local directory "
        "saved with save_pretrained (encoder=hf:/path/to/dir) or the offline encoder efficientnet-lite0"
    )
    if offline:
        raise OSError(hint)
    try:
        return AutoModel.from_pretrained(ref, **kw)
    except OSError:
        raise OSError(hint) from None


class HFEncoder(SupportEncoder):
    """Frozen transformers vision backbone as a multi-level support encoder.

    Args:
        ref: Hub id or local directory.
        revision: Hub revision (branch, tag or commit); stored in the spec.
        input_size: Crop size (a multiple of the patch size for ViTs).
    """

    def __init__(self, ref: str, revision: str | None = None, input_size: int = 224) -> None:
        super().__init__()
        self.model = load_hf_model(ref, revision).eval().requires_grad_(False)
        cfg = self.model.config
        self.is_vit = hasattr(cfg, "num_hidden_layers") and not hasattr(cfg, "hidden_sizes")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if self.is_vit:
            n = cfg.num_hidden_layers
            self.layers = sorted({max(1, round(n * (i + 1) / 4)) for i in range(4)})
            self.patch = int(cfg.patch_size)
            self.skip = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)  # CLS + registers precede the patches
            dims, tokens = (int(cfg.hidden_size),) * len(self.layers), 2
        else:
            dims, tokens = tuple(int(c) for c in cfg.hidden_sizes), 1
        name = f"hf:{ref}" if not Path(ref).is_dir() else f"hf:{Path(ref).resolve()}"
        self.spec = EncoderSpec(name, dims, tokens, input_size, revision or "")

    def train(self, mode: bool = True) -> HFEncoder:
        return super().train(False)

    def forward(self, crops: Tensor, masks: Tensor | None = None) -> list[Tensor]:
        x = (crops - self.mean) / self.std
        out = self.model(pixel_values=x, output_hidden_states=True)
        hs = out.hidden_states
        if not self.is_vit:  # ConvNeXt: hidden_states[0] is the stem, then one map per stage
            return [masked_mean(h, masks)[:, None] for h in hs[-4:]]
        norm = getattr(self.model, "layernorm", None) or getattr(self.model, "norm", None)  # DINOv2 / DINOv3 names
        g = x.shape[-1] // self.patch
        m = None if masks is None else resize_mask(masks, (g, g)).flatten(1)  # [K, g*g]
        levels = []
        for i in self.layers:
            h = hs[i]
            if i == len(hs) - 1 and norm is not None:  # the last layer as the model outputs it
                h = norm(h)
            cls, patches = h[:, 0], h[:, self.skip :]
            if m is None:
                pooled = patches.mean(1)
            else:
                pooled = (patches * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-6)
            levels.append(torch.stack([cls, pooled], 1))
        return levels
