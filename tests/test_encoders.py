"""Support encoders: real EfficientNet-Lite weights, HF loading by path with tiny random configs, spec, errors."""

import os
import subprocess
import sys

import cv2
import pytest
import torch
from skimage import data

from yolo_fewshot.encoders import build_encoder
from yolo_fewshot.encoders.efficientnet_lite import EfficientNetLiteEncoder
from yolo_fewshot.encoders.hf import HFEncoder

ESPRESSO = 967  # ImageNet class index


@pytest.fixture(scope="module")
def lite0():
    return build_encoder("efficientnet-lite0")


def _imagenet_input(size):
    x = cv2.resize(data.coffee(), (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("name,size", [("efficientnet-lite0", 224), ("efficientnet-lite2", 260)])
def test_efficientnet_lite_weights_classify_coffee_as_espresso(name, size):
    enc = EfficientNetLiteEncoder(name)
    with torch.no_grad():
        top5 = enc.net(enc.net.normalize(_imagenet_input(size))).topk(5).indices[0].tolist()
    assert ESPRESSO in top5, top5


def test_lite0_levels_and_spec(lite0):
    assert lite0.spec.dims == (24, 40, 112, 320) and lite0.spec.tokens == 1 and lite0.spec.input_size == 224
    out = lite0.encode(torch.rand(3, 3, 224, 224), torch.ones(3, 1, 224, 224))
    assert [tuple(o.shape) for o in out] == [(3, 1, d) for d in lite0.spec.dims]
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training  # frozen BN statistics whatever the caller does


def test_mask_restricts_pooling(lite0):
    x = torch.rand(1, 3, 224, 224)
    left, right = torch.zeros(1, 1, 224, 224), torch.zeros(1, 1, 224, 224)
    left[..., :112], right[..., 112:] = 1, 1
    a, b = lite0.encode(x, left), lite0.encode(x, right)
    assert (a[0] - b[0]).abs().max() > 1e-3


TINY = {
    "dinov2": ("Dinov2Config", "Dinov2Model", dict(patch_size=14, image_size=56), 56),
    "dinov2_registers": (
        "Dinov2WithRegistersConfig",
        "Dinov2WithRegistersModel",
        dict(patch_size=14, image_size=56, num_register_tokens=2),
        56,
    ),
    "dinov3_vit": ("DINOv3ViTConfig", "DINOv3ViTModel", dict(patch_size=16, image_size=64, num_register_tokens=4), 64),
    "dinov3_convnext": (
        "DINOv3ConvNextConfig",
        "DINOv3ConvNextModel",
        dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
        64,
    ),
}


@pytest.mark.parametrize("kind", sorted(TINY))
def test_hf_encoder_loads_saved_tiny_model_by_path(kind, tmp_path):
    import transformers

    cfg_name, model_name, kw, size = TINY[kind]
    if "hidden_sizes" not in kw:
        kw = {**kw, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}
    getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kw)).save_pretrained(tmp_path)
    enc = build_encoder(f"hf:{tmp_path}")
    assert isinstance(enc, HFEncoder) and enc.spec.name == f"hf:{tmp_path.resolve()}"
    enc.spec = type(enc.spec)(enc.spec.name, enc.spec.dims, enc.spec.tokens, size)
    out = enc.encode(torch.rand(2, 3, size, size), torch.ones(2, 1, size, size))
    tokens = 1 if kind == "dinov3_convnext" else 2
    dims = [8, 16, 24, 32] if kind == "dinov3_convnext" else [32] * 4
    assert [tuple(o.shape) for o in out] == [(2, tokens, d) for d in dims]
    assert list(enc.spec.dims) == dims and enc.spec.tokens == tokens
    if tokens == 2:  # the masked patch mean follows the mask, the CLS token does not
        half = torch.zeros(2, 1, size, size)
        half[..., : size // 2] = 1
        masked = enc.encode(torch.rand(2, 3, size, size), half)
        assert masked[0].shape == (2, 2, 32)


def test_hub_id_offline_is_one_clear_line():
    code = (
        "from yolo_fewshot.encoders import build_encoder\n"
        "try:\n    build_encoder('hf:facebook/dinov2-small')\n"
        "except OSError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("ERR")][0]
    assert "cannot load 'facebook/dinov2-small'" in line and "efficientnet-lite0" in line


def test_unknown_encoder():
    with pytest.raises(ValueError, match="unknown encoder 'dino'; choose one of efficientnet-lite0"):
        build_encoder("dino")
