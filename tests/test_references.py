"""Crops, aggregation, ReferenceBank and building banks from photos; every bad input the issue lists."""

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from yolo_fewshot import FewShotYOLO
from yolo_fewshot.encoders import build_encoder
from yolo_fewshot.encoders.base import EncoderSpec
from yolo_fewshot.references.aggregate import aggregate, geometric_median
from yolo_fewshot.references.bank import ReferenceBank
from yolo_fewshot.references.build import build_bank
from yolo_fewshot.references.crops import crop_array, make_crop, read_image


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("efficientnet-lite0")


def _write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = (
        cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
        if img.ndim == 3 and img.shape[2] == 4
        else (cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img)
    )
    assert cv2.imwrite(str(path), bgr)
    return path


# -- crops ----
def test_crop_keeps_aspect_and_masks_the_box():
    img = np.zeros((100, 200, 3), np.uint8)
    crop, mask = make_crop(img, [50, 25, 150, 75], size=64, context=0.0)
    assert crop.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
    # 100x50 box -> 64x32, centred vertically, grey (114) above and below
    assert torch.allclose(crop[:, :10], torch.full_like(crop[:, :10], 114 / 255))
    assert mask[0, 32, 32] == 1 and mask[0, 5, 32] == 0
    _, mask_ctx = make_crop(img, [50, 25, 150, 75], size=64, context=0.25)
    assert mask_ctx.sum() < mask.sum()  # context pixels are outside the mask


def test_grayscale_rgba_and_16bit(tmp_path):
    gray = data.camera()
    assert read_image(gray)[0].shape == (*gray.shape, 3)
    rgba = np.dstack([data.astronaut(), np.zeros(data.astronaut().shape[:2], np.uint8)])
    rgba[100:300, 100:300, 3] = 255
    img, alpha = read_image(_write(tmp_path / "a.png", rgba))
    assert img.shape[2] == 3 and alpha[200, 200] == 1 and alpha[10, 10] == 0
    _, mask = make_crop(tmp_path / "a.png", size=64, context=0)
    assert 0.1 < mask.mean() < 0.3  # the alpha cut-out, not the whole frame
    deep = data.astronaut().astype(np.uint16) * 257
    img16, _ = read_image(_write(tmp_path / "d.png", deep))
    assert img16.dtype == np.uint8 and np.abs(img16.astype(int) - data.astronaut()).max() <= 1


@pytest.mark.parametrize(
    "box,msg",
    [
        ([10, 10, 10, 50], "zero or negative area"),
        ([-5, 0, 20, 20], "outside"),
        ([0, 0, 600, 20], "outside"),
        ([1, 2, 3], "4 numbers"),
    ],
)
def test_bad_boxes(box, msg):
    with pytest.raises(ValueError, match=msg):
        make_crop(data.astronaut(), box)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference image not found"):
        make_crop(tmp_path / "nope.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="not an image or corrupt"):
        make_crop(tmp_path / "bad.jpg")


# -- aggregation ----
def test_robust_aggregation_resists_an_outlier():
    torch.manual_seed(0)
    cluster = torch.randn(1, 1, 16) + 0.05 * torch.randn(5, 1, 16)
    refs = torch.cat([cluster, cluster[:1] + 50])  # one wrong reference far away
    centre = cluster.mean(0)
    assert (aggregate(refs, "robust") - centre).norm() < 0.1 * (aggregate(refs, "mean") - centre).norm()
    assert torch.equal(aggregate(refs[:2], "robust"), aggregate(refs[:2], "mean"))


def test_geometric_median_is_the_minimiser():
    x = torch.randn(7, 3, dtype=torch.float64)
    y = geometric_median(x)
    cost = lambda p: (x - p).norm(dim=1).sum()  # noqa: E731
    for _ in range(20):
        assert cost(y) <= cost(y + 1e-3 * torch.randn(3, dtype=torch.float64)) + 1e-9


# -- bank ----
SPEC = EncoderSpec("test-encoder", (4, 6), 2, 32)


def _emb(k, spec=SPEC):
    return [torch.randn(k, spec.tokens, d) for d in spec.dims]


def test_bank_roundtrip_is_bit_exact(tmp_path):
    bank = ReferenceBank(SPEC, "robust")
    bank.add("mug", _emb(3), [{"file": "a.jpg", "sha256": "x", "box": None}] * 3, negatives=_emb(2))
    bank.add("key", _emb(1))
    path = bank.save(tmp_path / "b.safetensors")
    loaded = ReferenceBank.load(path)
    assert loaded.names == ["mug", "key"] and loaded.method == "robust" and loaded.spec == SPEC
    for name in bank.names:
        a, b = bank.classes[name], loaded.classes[name]
        assert all(torch.equal(x, y) for x, y in zip(a.embeddings, b.embeddings))
        assert a.sources == b.sources
    assert all(torch.equal(x, y) for x, y in zip(bank.classes["mug"].negatives, loaded.classes["mug"].negatives))
    assert [p.shape for p in loaded.prototypes()] == [(2, 2, 4), (2, 2, 6)]
    assert [p.shape for p in loaded.prototypes(levels=1)] == [(2, 2, 6)]


def test_add_and_remove_leave_other_classes_untouched():
    bank = ReferenceBank(SPEC)
    bank.add("a", _emb(2))
    bank.add("b", _emb(2))
    before = bank.prototypes()[0][1].clone()
    bank.remove("a")
    bank.add("c", _emb(1))
    assert bank.names == ["b", "c"] and torch.equal(bank.prototypes()[0][0], before)


def test_bank_bad_inputs(tmp_path):
    bank = ReferenceBank(SPEC)
    bank.add("Mug", _emb(1))
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add("mug", _emb(1))
    with pytest.raises(ValueError, match="no reference image"):
        bank.add("empty", _emb(0))
    with pytest.raises(ValueError, match="NaN"):
        bank.add("nan", [torch.full((1, 2, 4), float("nan")), torch.zeros(1, 2, 6)])
    with pytest.raises(ValueError, match="gives \\[K, 2, 6\\]"):
        bank.add("wide", [torch.zeros(1, 2, 4), torch.zeros(1, 2, 7)])
    with pytest.raises(ValueError, match="empty"):
        ReferenceBank(SPEC).prototypes()
    with pytest.raises(ValueError, match="made with encoder test-encoder"):
        bank.check_encoder(EncoderSpec("efficientnet-lite0", (24, 40, 112, 320)))
    # a bank file with a NaN written into it is refused on load
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = bank.save(tmp_path / "b.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    t = load_file(path)
    t["c0.pos.l0"][0, 0, 0] = float("nan")
    save_file(t, path, metadata=meta)
    with pytest.raises(ValueError, match="NaN"):
        ReferenceBank.load(path)
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read reference bank"):
        ReferenceBank.load(tmp_path / "x.safetensors")


# -- building from photos ----
def _refs_dir(tmp_path):
    root = tmp_path / "refs"
    _write(root / "coffee" / "1.jpg", data.coffee())
    _write(root / "coffee" / "2.png", data.coffee()[::-1].copy())
    _write(root / "cat" / "1.jpg", data.chelsea())
    _write(root / "frames" / "astronaut.jpg", data.astronaut())
    (root / "refs.yaml").write_text(
        "classes:\n  person:\n    - {image: frames/astronaut.jpg, box: [140, 20, 330, 200]}\n"
        "negatives:\n  cat: [frames/astronaut.jpg]\n"
    )
    return root


def test_build_from_folder_with_refs_yaml(tmp_path, encoder):
    bank = build_bank(encoder, _refs_dir(tmp_path))
    assert bank.names == ["cat", "coffee", "frames", "person"]
    assert [bank.classes[n].k for n in bank.names] == [1, 2, 1, 1]
    assert bank.classes["person"].sources[0]["box"] == [140.0, 20.0, 330.0, 200.0]
    assert bank.classes["cat"].negatives[0].shape == (1, 1, 24)
    assert len(bank.classes["coffee"].sources[0]["sha256"]) == 64


def test_build_from_a_relative_folder(tmp_path, encoder, monkeypatch):
    """`refs=refs/` on the command line: a folder given relative to the working directory (its photos were once
    joined to it twice: refs/refs/cup/1.jpg)."""
    _refs_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    bank = build_bank(encoder, "refs")
    assert bank.names == ["cat", "coffee", "frames", "person"]


def test_build_errors(tmp_path, encoder):
    with pytest.raises(ValueError, match="no references given"):
        build_bank(encoder, {})
    with pytest.raises(ValueError, match="class 'mug' has no reference image"):
        build_bank(encoder, {"mug": []})
    with pytest.raises(ValueError, match="same class"):
        build_bank(encoder, {"Mug": [data.coffee()], "mug ": [data.coffee()]})
    with pytest.raises(FileNotFoundError, match="references not found"):
        build_bank(encoder, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        build_bank(encoder, tmp_path / "empty")
    root = _refs_dir(tmp_path)
    (root / "refs.yaml").write_text("classes:\n  person: [frames/astronaut.jpg]\n  person: [cat/1.jpg]\n")
    with pytest.raises(ValueError, match="names \\['person'\\] twice"):
        build_bank(encoder, root)
    with pytest.raises(ValueError, match="not reference classes"):
        build_bank(encoder, {"mug": [data.coffee()]}, negatives={"cup": [data.coffee()]})


def test_model_set_references_and_reload(tmp_path, encoder):
    model = FewShotYOLO("yolov8n-psalm-p2.yaml", encoder="efficientnet-lite0")
    bank = model.set_references(
        {"coffee": [data.coffee()], "cat": [(data.chelsea(), [50, 20, 400, 290])]}, method="robust"
    )
    assert model.names == {0: "coffee", 1: "cat"} and model.references is bank
    y, _ = model.model.eval()(torch.rand(1, 3, 64, 64))
    assert y.shape[1] == 4 + 2
    bank.save(tmp_path / "bank.safetensors")
    model.save(tmp_path / "m.pt")
    ckpt = torch.load(tmp_path / "m.pt", weights_only=False)
    assert not any("encoder" in name or "_blocks" in name for name, _ in ckpt["model"].named_modules())
    assert ckpt["model"].yaml["encoder_spec"]["dims"] == [24, 40, 112, 320]  # the spec, not the weights
    reloaded = FewShotYOLO(tmp_path / "m.pt")
    assert reloaded.encoder_name == "efficientnet-lite0" and reloaded.model.proto_dims == [24, 40, 112, 320]
    reloaded.set_references(tmp_path / "bank.safetensors")
    assert reloaded.names == {0: "coffee", 1: "cat"}
    other = EncoderSpec("hf:facebook/dinov2-small", (384,) * 4, 2)
    foreign = ReferenceBank(other)
    foreign.add("x", [torch.zeros(1, 2, 384)] * 4)
    with pytest.raises(ValueError, match="made with encoder hf:facebook/dinov2-small"):
        reloaded.set_references(foreign)
    with pytest.raises(ValueError, match="trained with encoder efficientnet-lite0"):
        FewShotYOLO(tmp_path / "m.pt", encoder="efficientnet-lite2")


# -- embedding cache -----
def test_embedding_cache_computes_once_and_tracks_content(tmp_path, encoder):
    from yolo_fewshot.references.cache import EmbeddingCache

    img = _write(tmp_path / "imgs" / "a.jpg", data.coffee())
    items = [(img, [10, 10, 200, 200]), (img, None), (img, [10, 10, 200, 200])]
    cache = EmbeddingCache(tmp_path / "cache", encoder, views=2)
    first = cache.embed(items)
    assert cache.encoded == 2 and [tuple(e.shape) for e in first[0]] == [(2, 1, d) for d in encoder.spec.dims]
    assert all(torch.equal(a, b) for a, b in zip(first[0], first[2]))
    assert not torch.equal(first[0][0][0], first[0][0][1])  # the flipped view differs
    again = EmbeddingCache(tmp_path / "cache", encoder, views=2)  # a new run: everything comes from disk
    second = again.embed(items)
    assert again.encoded == 0 and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    _write(img, data.chelsea())  # same path, new content: recomputed
    third = again.embed(items[:1])
    assert again.encoded == 1 and not torch.equal(third[0][0], first[0][0])


# -- reliability: hand-edited refs.yaml and banks, out-of-range values, tiny references, stale temp files ----
@pytest.mark.parametrize(
    "text,msg",
    [
        ("classes: [a\n  b: {\n", r"refs\.yaml is not valid YAML \(line 2"),
        ("42\n", r"refs\.yaml must be a mapping with 'classes' and/or 'negatives', not int"),
        ("classes:\n  - cat/1.jpg\n", r"refs\.yaml: 'classes' must map class names to lists of references, not list"),
        ("negatives: [cat/1.jpg]\n", r"refs\.yaml: 'negatives' must map class names to lists of references, not list"),
        ("classes:\n  person: 7\n", r"refs\.yaml: class 'person' must list references \(image paths or"),
        ("classes:\n  person:\n    - {image: frames/astronaut.jpg, box: [.nan, 20, 330, 200]}\n", r"finite numbers"),
    ],
)
def test_bad_refs_yaml_is_one_line_naming_the_file(tmp_path, encoder, text, msg):
    root = _refs_dir(tmp_path)
    (root / "refs.yaml").write_text(text)
    with pytest.raises(ValueError, match=msg) as e:
        build_bank(encoder, root)
    assert "\n" not in str(e.value) and str(root / "refs.yaml") in str(e.value)


def test_refs_yaml_class_given_one_reference_without_a_list(tmp_path, encoder):
    root = _refs_dir(tmp_path)
    (root / "refs.yaml").write_text("classes:\n  person: frames/astronaut.jpg\n")
    assert build_bank(encoder, root).classes["person"].k == 1  # one path, not one reference per character


def _edit_bank(tmp_path, meta=None, drop=(), tensors=None):
    """Save a 1-class bank with negatives, then rewrite its metadata / tensors as a hand edit would."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    bank = ReferenceBank(SPEC)
    bank.add("mug", _emb(2), negatives=_emb(1))
    path = bank.save(tmp_path / "b.safetensors")
    with safe_open(str(path), "pt") as f:
        raw = f.metadata()["yolo_fewshot"]
    t = {k: v for k, v in load_file(path).items() if not k.startswith(drop)} if drop else load_file(path)
    t.update(tensors or {})
    doc = meta(json.loads(raw)) if callable(meta) else raw
    save_file(t, path, metadata={"yolo_fewshot": doc if isinstance(doc, str) else json.dumps(doc)})
    return path


@pytest.mark.parametrize(
    "edit,msg",
    [
        (dict(meta=lambda m: "{not json"), r"metadata is not valid JSON"),
        (dict(meta=lambda m: [1, 2]), r"metadata must be a JSON object, not list"),
        (dict(meta=lambda m: {k: v for k, v in m.items() if k != "classes"}), r"metadata has no 'classes'"),
        (dict(meta=lambda m: {k: v for k, v in m.items() if k != "encoder"}), r"metadata has no 'encoder'"),
        (dict(meta=lambda m: {**m, "encoder": {"name": "x"}}), r"metadata 'encoder' is not an encoder spec"),
        (dict(meta=lambda m: {**m, "classes": ["mug"]}), r"metadata 'classes' entry 0 is not an object"),
        (dict(drop=("c0.pos",)), r"class 'mug' has no tensor c0\.pos\.l0"),
        (dict(drop=("c0.neg",)), r"class 'mug' says it has negatives but the file has no tensor c0\.neg\.l0"),
        (dict(tensors={"c0.pos.l0": torch.full((2, 2, 4), 1e30)}), r"out of range .*65504"),
    ],
)
def test_hand_edited_bank_is_one_line_naming_the_file(tmp_path, edit, msg):
    path = _edit_bank(tmp_path, **edit)
    with pytest.raises(ValueError, match=msg) as e:
        ReferenceBank.load(path)
    assert str(e.value).startswith(f"reference bank {path}") and "\n" not in str(e.value)


def test_out_of_range_embeddings_are_refused_when_added():
    bank = ReferenceBank(SPEC)
    with pytest.raises(ValueError, match="out of range"):
        bank.add("huge", [torch.full((1, 2, 4), 1e30), torch.zeros(1, 2, 6)])
    bank.add("fine", [torch.full((1, 2, 4), 6e4), torch.zeros(1, 2, 6)])  # within float16's range


def test_encoder_producing_nan_is_one_line(tmp_path):
    enc = build_encoder("efficientnet-lite0")
    with torch.no_grad():
        next(enc.parameters()).fill_(float("nan"))  # a corrupt encoder: its outputs are NaN
    with pytest.raises(ValueError, match=r"encoder efficientnet-lite0 produced NaN or Inf for class 'cat' \(.*1\.jpg"):
        build_bank(enc, {"cat": [_write(tmp_path / "cat" / "1.jpg", data.chelsea())]})


def test_tiny_reference_warns(tmp_path, encoder):
    tiny = _write(tmp_path / "dot.png", np.full((1, 1, 3), 200, np.uint8))
    with pytest.warns(UserWarning, match=r"reference .*dot\.png is only 1x1 px"):
        build_bank(encoder, {"dot": [tiny]})
    with pytest.warns(UserWarning, match=r"only 6x4 px"):
        build_bank(encoder, {"cat": [(data.chelsea(), [10, 10, 16, 14])]})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal reference: no warning
        build_bank(encoder, {"cat": [data.chelsea()]})


def test_stale_temp_files_of_killed_saves_are_cleaned_on_the_next_save(tmp_path):
    import subprocess
    import sys
    import time

    from yolo_fewshot.atomic import temp_path

    bank = ReferenceBank(SPEC)
    bank.add("mug", _emb(1))
    target = tmp_path / "b.safetensors"
    # a writer killed mid-save leaves its temp file: here a process that exits right after creating it
    code = f"from yolo_fewshot.atomic import temp_path; p = temp_path(r'{target}'); p.write_bytes(b'x'); print(p)"
    dead = Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())
    legacy = tmp_path / ".b.safetensors.k3j_x9a2"  # mkstemp's name, from before temp names carried the pid
    legacy.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(legacy, (old, old))
    live = temp_path(target)  # a save in progress in this (live) process: left alone
    live.write_bytes(b"x")
    fresh_legacy = tmp_path / ".b.safetensors.a1b2c3d4"  # recent, owner unknown: left alone
    fresh_legacy.write_bytes(b"x")
    assert dead.is_file() and dead.name.startswith(".b.safetensors.")
    bank.save(target)
    assert not dead.exists() and not legacy.exists() and live.exists() and fresh_legacy.exists()
    assert ReferenceBank.load(target).names == ["mug"]


def test_a_whole_photo_reference_is_framed_like_a_boxed_one():
    # the object at the same size and place in the crop whether the photo is cut to it or holds it with context
    photo = cv2.resize(data.astronaut(), (100, 100))
    crop, mask = crop_array(photo, None, size=120, context=0.1)  # whole photo: a 10 px ring beyond its edges
    assert mask[10:110, 10:110].min() == 1 and mask.sum() == 100 * 100
    np.testing.assert_array_equal(crop[10:110, 10:110], photo)
    np.testing.assert_array_equal(crop[:10, 10:110], np.repeat(photo[:1], 10, 0))  # the ring repeats the edge
    wide = cv2.copyMakeBorder(photo, 30, 30, 30, 30, cv2.BORDER_REPLICATE)  # the same photo with room around it
    crop2, mask2 = crop_array(wide, [30, 30, 130, 130], size=120, context=0.1)
    np.testing.assert_array_equal(mask2, mask)
    np.testing.assert_array_equal(crop2, crop)
