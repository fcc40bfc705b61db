"""Support encoders: real EfficientNet-Lite weights, HF loading by path with tiny random configs, spec, errors."""

import os
import subprocess
import sys
from pathlib import Path

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


# -- QAViT (seed 004) ----
def _tiny_qavit():
    from yolo_fewshot.encoders.qavit import QAViTConfig, QAViTEncoder

    cfg = QAViTConfig(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=4,
        num_heads=2,
        global_bank_size=4,
        window_size=2,
        channel_groups=2,
        linformer_k=8,
    )
    return QAViTEncoder("qavit-test", cfg)


def test_qavit_shapes_gradients_and_levels():
    enc = _tiny_qavit()
    out = enc(torch.rand(2, 3, 32, 32), torch.ones(2, 1, 32, 32))
    assert [tuple(o.shape) for o in out] == [(2, 2, 32)] * 4 and enc.levels == [0, 1, 2, 3]
    sum(o.square().sum() for o in out).backward()
    assert not [k for k, p in enc.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]


@pytest.mark.parametrize("name,d,depth", [("qavit-tiny", 256, 12), ("qavit-small", 384, 16)])
def test_qavit_seed_constraints(name, d, depth):
    from yolo_fewshot.encoders.qavit import CONFIGS, QuadAttentionBlock

    cfg = CONFIGS[name]
    blk = QuadAttentionBlock(cfg)
    assert (cfg.embed_dim, cfg.depth) == (d, depth)
    assert blk.dc == d // 4  # d' = d/4
    assert blk.bottleneck[0].in_features == 4 * blk.dc and blk.bottleneck[0].out_features == d // 2  # 4d' -> r=d/2
    assert blk.ffn_in.out_features == d // 2 and blk.compress.out_features == 64  # FFN ratio 0.5, Linformer k=64


def test_dilated_grid_roundtrip():
    from yolo_fewshot.encoders.qavit import _dilate, _undilate

    x = torch.randn(2, 7 * 5, 3)
    for r in (1, 2, 3):
        g, sub = _dilate(x, (7, 5), r)
        assert g.shape[0] == 2 * r * r
        assert torch.equal(_undilate(g, 2, (7, 5), sub, r), x)


def test_qavit_wrong_input_size_is_clear():
    with pytest.raises(ValueError, match="built for 32px inputs"):
        _tiny_qavit()(torch.rand(1, 3, 48, 48))


def test_qavit_builds_by_name():
    enc = build_encoder("qavit-tiny")
    assert enc.spec.dims == (256,) * 4 and enc.spec.tokens == 2 and any(p.requires_grad for p in enc.parameters())


def test_cli_with_an_unreachable_hub_encoder_is_one_line(tmp_path):
    """A model YAML whose default encoder is a hub id, offline: the one-line hint, without a traceback before it."""
    (tmp_path / "refs" / "cat").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "refs" / "cat" / "1.jpg"), cv2.cvtColor(data.chelsea(), cv2.COLOR_RGB2BGR))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = [
        sys.executable,
        "-m",
        "yolo_fewshot.cli",
        "info",
        "model=yolov8n-psalm-p2.yaml",
        f"refs={tmp_path / 'refs'}",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("yolo-fewshot: error: cannot load 'facebook/dinov2-small'") and "efficientnet-lite0" in err
