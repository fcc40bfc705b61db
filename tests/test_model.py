"""FewShotYOLO / FewShotDetectionModel: every YAML at every scale builds, runs with and without prototypes, saves,
reloads in a fresh process, fuses; prototype validation."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from yolo_fewshot import FewShotDetectionModel, FewShotYOLO
from yolo_fewshot.configs import load_model_yaml, model_yamls, resolve_model_yaml
from yolo_fewshot.nn.fusion_neck import FusionNeck, scale_channels
from yolo_fewshot.nn.head import FewShotDetect

YAMLS = [p.name for p in model_yamls()]
SCALES = "nslmx"
SOURCE_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # the tree under test


V8_YAMLS = [y for y in YAMLS if "lite" not in y]  # YOLOv8 backbone; the pretrained-backbone YAML has its own test


def test_shipped_yamls():
    assert set(YAMLS) == {
        "yolov8-psalm-p2.yaml",
        "yolov8-cheaf-p2.yaml",
        "yolov8-psalm.yaml",
        "yolov8-cheaf.yaml",
        "yolov8-lite0-psalm-p2.yaml",
        "yolov8-lite0-proto.yaml",
        "yolov8-lite0.yaml",  # plain Ultralytics Detect on the same trunk: the baseline of the speed tools
    }


@pytest.mark.parametrize("scale", "ns")
def test_lite_backbone_yaml_starts_from_the_imagenet_weights(scale):
    from yolo_fewshot.encoders.efficientnet_lite import weights_path
    from yolo_fewshot.nn.lite_backbone import LiteBackbone

    fs = FewShotYOLO(f"yolov8{scale}-lite0-psalm-p2.yaml")
    model = fs.model
    assert model.stride.tolist() == [4.0, 8.0, 16.0, 32.0] and fs.encoder_name == "efficientnet-lite0"
    backbone = model.model[0]
    assert isinstance(backbone, LiteBackbone)
    pretrained = torch.load(weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True)
    own = backbone.net.state_dict()
    shared = [k for k in pretrained if k in own]
    assert len(shared) > 200 and all(torch.equal(own[k], pretrained[k]) for k in shared)  # not re-initialised
    neck = next(m for m in model.model if isinstance(m, FusionNeck))
    assert neck.c_in == [24, 40, 112, 320] and neck.proto_dims == [24, 40, 112, 320]
    fs.set_prototypes(_protos(2, dims=(24, 40, 112, 320)), ["cat", "cup"])
    y, _ = model.eval()(torch.rand(1, 3, 128, 96))
    assert y.shape[:2] == (1, 4 + 2)
    with pytest.raises(ValueError, match="LiteBackbone 'resnet50' is not one of"):
        LiteBackbone.yaml_build([3], ["resnet50"], {})


@pytest.mark.parametrize("yaml", V8_YAMLS)
@pytest.mark.parametrize("scale", SCALES)
def test_every_yaml_and_scale_builds_with_right_channels_and_strides(yaml, scale):
    name = yaml.replace("yolov8", f"yolov8{scale}")
    model = FewShotYOLO(name).model
    cfg = load_model_yaml(name)
    depth, width, max_ch = cfg["scales"][scale]
    neck = next(m for m in model.model if isinstance(m, FusionNeck))
    head = model.model[-1]
    assert isinstance(head, FewShotDetect) and head.nc == 1
    levels = 4 if yaml.endswith("-p2.yaml") else 3
    assert model.stride.tolist() == [4.0, 8.0, 16.0, 32.0][4 - levels :]
    nominal_out = cfg["head"][0][3][0]
    expected = [scale_channels(c, width, max_ch) for c in nominal_out]
    assert neck.c_out == expected
    assert [seq[0].conv.in_channels for seq in head.cv2] == expected  # Detect sees the neck's scaled widths
    backbone = [model.model[i] for i in neck.f]
    assert neck.c_in == [getattr(m, "cv2", m).conv.out_channels for m in backbone]
    assert neck.proto_dims == [384] * levels


@pytest.fixture(scope="module")
def model():
    return FewShotYOLO("yolov8n-psalm-p2.yaml")


def _protos(n, dims=(384,) * 4):
    return [torch.randn(n, d) for d in dims]


def test_forward_with_and_without_prototypes(model):
    dm = model.model.eval()
    x = torch.rand(2, 3, 128, 96)
    y, raw = dm(x)
    assert y.shape == (2, 5, 32 * 24 + 16 * 12 + 8 * 6 + 4 * 3) and model.names == {0: "object"}
    model.set_prototypes(_protos(3), ["cat", "dog", "cup"])
    y3, _ = dm(x)
    assert y3.shape == (2, 4 + 3, y.shape[-1]) and model.names == {0: "cat", 1: "dog", 2: "cup"}
    # per class, the score equals the score of a 1-class run with that class (classes do not interact)
    protos = model.model.prototypes
    for n in range(3):
        model.set_prototypes([p[:, n : n + 1] for p in protos])
        y1, _ = dm(x)
        torch.testing.assert_close(y1[:, 4], y3[:, 4 + n], atol=1e-5, rtol=1e-4)
    model.set_prototypes(None)
    assert all(getattr(m, "prototypes", None) is None for m in dm.model)  # unbound after every forward


def test_boxes_come_from_the_best_scoring_class(model):
    dm = model.model.eval()
    x = torch.rand(1, 3, 64, 64)
    protos = _protos(2)
    model.set_prototypes(protos)
    y, _ = dm(x)
    singles = []
    for n in range(2):
        model.set_prototypes([p[n : n + 1] for p in protos])
        singles.append(dm(x)[0])
    best = y[:, 4:].argmax(1)  # [1, A]
    expect = torch.where(best[:, None] == 0, singles[0][:, :4], singles[1][:, :4])
    torch.testing.assert_close(y[:, :4], expect, atol=1e-4, rtol=1e-4)
    model.set_prototypes(None)


def test_prototype_validation_errors(model):
    with pytest.raises(ValueError, match="levels"):
        model.set_prototypes(_protos(2)[:3])
    with pytest.raises(ValueError, match="another encoder"):
        model.set_prototypes(_protos(2, (384, 384, 384, 256)))
    with pytest.raises(ValueError, match="NaN"):
        model.set_prototypes([torch.full((1, 384), float("nan"))] * 4)
    with pytest.raises(ValueError, match="unique"):
        model.set_prototypes(_protos(2), ["a", "a"])
    with pytest.raises(ValueError, match="2 class names for 3"):
        model.set_prototypes(_protos(3), ["a", "b"])
    model.set_prototypes(torch.randn(2, 384))  # one tensor for every level (equal widths)
    assert len(model.names) == 2
    model.set_prototypes(None)


def test_prototypes_follow_dtype_and_are_not_weights(model):
    model.set_prototypes(_protos(2))
    assert not any("proto" in k for k in model.model.state_dict())
    model.model.half()
    assert model.model.prototypes[0].dtype == torch.float16
    model.model.float()
    assert model.model.prototypes[0].dtype == torch.float32
    model.set_prototypes(None)


def test_fuse_keeps_outputs(model):
    m = FewShotYOLO("yolov8n-cheaf-p2.yaml")
    m.set_prototypes(_protos(2))
    x = torch.rand(1, 3, 64, 64)
    dm = m.model.eval()
    before = dm(x)[0]
    dm.fuse(verbose=False)
    assert dm.is_fused()
    torch.testing.assert_close(dm(x)[0], before, atol=1e-4, rtol=1e-3)


def test_save_and_reload_in_fresh_process(model, tmp_path):
    model.set_prototypes(_protos(2), ["mug", "key"])
    x = torch.rand(1, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    expected = model.model.eval().half().float()(x)[0]  # the checkpoint stores fp16 weights
    model.save(tmp_path / "m.pt")
    code = textwrap.dedent(f"""
        import torch
        from ultralytics import YOLO
        import yolo_fewshot
        from yolo_fewshot import FewShotYOLO, FewShotDetectionModel
        m = FewShotYOLO(r"{tmp_path / "m.pt"}")
        assert isinstance(m.model, FewShotDetectionModel), type(m.model)
        assert m.names == {{0: "mug", 1: "key"}}, m.names
        y = m.model.float().eval()(torch.load(r"{tmp_path / "x.pt"}"))[0]
        torch.save(y, r"{tmp_path / "y.pt"}")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=SOURCE_ENV)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, atol=1e-3, rtol=1e-3)
    model.set_prototypes(None)


def test_plain_ultralytics_checkpoint_is_refused(tmp_path):
    from ultralytics import YOLO

    plain = YOLO("yolov8n.yaml")
    plain.save(tmp_path / "plain.pt")
    with pytest.raises(TypeError, match="plain Ultralytics model"):
        FewShotYOLO(tmp_path / "plain.pt")


def test_yaml_resolution_errors():
    with pytest.raises(FileNotFoundError, match="yolov8-psalm-p2.yaml"):
        resolve_model_yaml("yolov8n-nope.yaml")
    assert resolve_model_yaml("yolov8s-psalm-p2.yaml")[1] == "s"


def test_yaml_without_the_requested_scale(tmp_path):
    src, _ = resolve_model_yaml("yolov8-psalm.yaml")
    text = src.read_text().replace("  x: [1.00, 1.25, 512]\n", "")
    (tmp_path / "yolov8x-custom.yaml").write_text(text)
    with pytest.raises(ValueError, match="no scale 'x'"):
        load_model_yaml(tmp_path / "yolov8x-custom.yaml")


def test_detection_model_directly():
    m = FewShotDetectionModel("yolov8n-psalm.yaml", verbose=False)
    assert m.proto_dims == [384, 384, 384]


def test_many_classes_run_in_chunks_with_identical_results():
    m = FewShotYOLO("yolov8n-psalm-p2.yaml")
    dm = m.model.eval()
    m.set_prototypes(_protos(5))
    x = torch.rand(2, 3, 64, 64)
    whole, raw = dm(x)
    dm.class_chunk = 2  # 3 chunks: 2 + 2 + 1 classes
    chunked, raw_c = dm(x)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(raw_c["scores"], raw["scores"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(raw_c["boxes"], raw["boxes"], atol=1e-5, rtol=1e-4)
