"""The real-photo benchmark: manifests, scene composition, fold generation, metrics, the window baseline and the demo.

The Debian photos are not fetched here (the tests stay offline and fast): folds are generated from synthetic
cut-outs through the same code, and the committed manifests and data YAMLs are checked against each other.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ultralytics.data.utils import check_det_dataset

from yolo_fewshot.data import benchmark as bm
from yolo_fewshot.data.compose import clean_photo, compose, jitter_cutout
from yolo_fewshot.data.debian import FetchError, fetch_debian

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- manifests ---------------------------------------------------------------------------------------------------------
def test_committed_manifests_are_consistent():
    stamps = bm.load_stamps()
    assert 250 <= len(stamps) <= 330  # ~290 photographic stamps of the package
    assert len({s.path for s in stamps}) == len(stamps)
    assert not any(s.path.startswith(bm.EXCLUDED_FOLDERS) or "/cartoon/" in s.path for s in stamps)
    assert all(len(s.sha) == 16 for s in stamps)
    counts = {c: sum(s.cls == c for s in stamps) for c in {s.cls for s in stamps if s.cls}}
    assert min(counts.values()) >= bm.MIN_PER_CLASS
    assert bm.assign_classes([s.path for s in stamps]) == {s.path: s.cls for s in stamps}  # the rule wrote them
    for cats in bm.FOLDS.values():  # every fold has novel classes and keeps base classes
        assert any(s.category in cats and s.cls for s in stamps) and any(s.category not in cats for s in stamps)
    bgs = bm.load_backgrounds()
    assert {b[0] for b in bgs} == {"plasma", "mate", "skimage"} and {b[2] for b in bgs} == {"train", "test"}
    assert not {b[1] for b in bgs if b[2] == "train"} & {b[1] for b in bgs if b[2] == "test"}


@pytest.mark.parametrize("fold", sorted(bm.FOLDS))
def test_committed_data_yamls_match_the_manifest(fold):
    import yaml

    src = bm.Sources(bm.load_stamps(), {}, {})
    d = yaml.safe_load((REPO / "data" / "stamps" / f"fold{fold}.yaml").read_text())
    assert list(d["names"].values()) == src.classes
    assert d["novel"] == [c for c in src.classes if src.category_of(c) in bm.FOLDS[fold]]
    inst = yaml.safe_load((REPO / "data" / "stamps" / f"fold{fold}-instance.yaml").read_text())
    assert list(inst["names"].values()) == inst["novel"] == [s.name for s in src.stamps if s.cls in d["novel"]]
    for y in (d, inst):  # Ultralytics requires train and val; the validator reads support
        assert {"train", "val", "support"} <= set(y) and "path" not in y  # splits resolve next to the YAML


def test_class_rule_merges_small_folders_up():
    paths = [f"a/b/{i}.png" for i in range(7)] + [f"a/c/{i}.png" for i in range(3)] + [f"a/d/{i}.png" for i in range(4)]
    paths += [f"z/{i}.png" for i in range(2)]
    cls = bm.assign_classes(paths)
    assert {cls[p] for p in paths if p.startswith("a/b/")} == {"b"}  # big enough: its own class
    assert {cls[p] for p in paths if p.startswith(("a/c/", "a/d/"))} == {"a"}  # 3 + 4 merged into the parent
    assert {cls[p] for p in paths if p.startswith("z/")} == {""}  # too small at the top: unlabelled clutter


def test_photographic_heuristic():
    rng = np.random.default_rng(0)
    rgb = cv2.GaussianBlur(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), (0, 0), 1)
    photo = np.dstack([rgb, np.full((64, 64), 255, np.uint8)])
    drawing = np.zeros((64, 64, 4), np.uint8)
    drawing[..., 0], drawing[..., 3] = 200, 255  # one flat colour
    assert bm.is_photographic(photo) and not bm.is_photographic(drawing)


def test_fetch_without_apt_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg
    with pytest.raises(FetchError, match="'apt-get' not found: .* run on Debian/Ubuntu") as e:
        fetch_debian("tuxpaint-stamps-default", tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / ".extracted").write_text("pkg_1.deb\n")
    assert fetch_debian("pkg", tmp_path) == tmp_path / "pkg"  # extracted once: reused without apt


# -- composition -------------------------------------------------------------------------------------------------
def _blob(rng, colour, size=60) -> np.ndarray:
    """A textured ellipse cut-out (RGBA uint8)."""
    im = np.zeros((size, int(size * 0.8), 4), np.uint8)
    axes = (im.shape[1] // 2 - 2, size // 2 - 2)
    cv2.ellipse(im, (im.shape[1] // 2, size // 2), axes, 0, 0, 360, (*colour, 255), -1)
    noise = rng.integers(0, 40, im.shape[:2] + (3,), dtype=np.uint8)
    im[..., :3] = np.where(im[..., 3:] > 0, np.clip(im[..., :3].astype(int) + noise, 0, 255), 0)
    return im


def test_compose_boxes_and_occlusion_bound():
    rng = np.random.default_rng(0)
    cuts = [jitter_cutout(_blob(rng, (200, 40, 40)), rng, 40) for _ in range(12)]
    img, placed = compose(np.zeros((128, 128, 3), np.float32), cuts, rng, max_occlusion=0.4)
    assert img.shape == (128, 128, 3) and len(placed) >= 3
    for p in placed:
        x1, y1, x2, y2 = p.box
        assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
        assert p.visible >= 0.6 - 1e-6  # never more than 40 % hidden by later objects
        assert img[y1:y2, x1:x2, 0].max() > 0.5  # the box holds the (red) object


def test_clean_photo_box_holds_the_object():
    rng = np.random.default_rng(1)
    img, (x1, y1, x2, y2) = clean_photo(_blob(rng, (20, 20, 220)), rng, 96)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    inside, outside = img[y1:y2, x1:x2, 2].mean(), np.delete(img[..., 2], np.s_[y1:y2], axis=0).mean()
    assert (x2 - x1) * (y2 - y1) > 0.25 * 96 * 96 and inside > 0 and img[(y1 + y2) // 2, (x1 + x2) // 2, 0] < 120
    assert outside > 150  # light background around it


# -- fold generation ---------------------------------------------------------------------------------------------------
def synthetic_sources(seed: int = 0) -> bm.Sources:
    """Stamps in the package's folder layout (food is fold 0's novel category) with synthetic cut-outs."""
    rng = np.random.default_rng(seed)
    layout = {"food/fruit": 8, "food/vegetables": 7, "animals/birds": 9, "household/tools": 8, "clothes": 3}
    paths = [f"{f}/{f.split('/')[-1]}{i}.png" for f, n in layout.items() for i in range(n)]
    cls = bm.assign_classes(paths)
    stamps = [bm.Stamp(p, cls[p], hashlib.sha256(p.encode()).hexdigest()[:16]) for p in paths]
    rgba = {p: _blob(rng, tuple(int(c) for c in rng.integers(30, 230, 3))) for p in paths}
    bgs = {s: [cv2.GaussianBlur(rng.integers(0, 255, (200, 260, 3), dtype=np.uint8), (0, 0), 4) for _ in range(3)]
           for s in ("train", "test")}  # fmt: skip
    return bm.Sources(stamps, rgba, bgs)


@pytest.fixture(scope="module")
def fold(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    y, iy = bm.build_fold(synthetic_sources(), out, 0, size=96, n_train=12, n_val=8, n_novel_train=4, n_instance=6)
    return out, y, iy


def test_fold_yamls_load_in_ultralytics(fold):
    out, y, iy = fold
    d = check_det_dataset(str(y))
    assert list(d["names"].values()) == ["birds", "fruit", "vegetables", "tools"]
    assert d["novel"] == ["fruit", "vegetables"] and Path(d["val"]).is_dir()
    i = check_det_dataset(str(iy))
    assert i["nc"] == 15 and len(list(Path(i["val"]).glob("*.jpg"))) == 6


def test_novel_categories_never_in_training_and_references_never_in_scenes(fold):
    out, _, _ = fold
    objs = {s: json.loads((out / "fold0" / f"objects_{s}.json").read_text()) for s in ("train", "val", "support")}
    train_stamps = {o["stamp"] for v in objs["train"].values() for o in v}
    assert train_stamps and not any(s.startswith("food/") for s in train_stamps)  # labelled or clutter
    ref_stamps = {o["stamp"] for v in objs["support"].values() for o in v}
    scene_stamps = train_stamps | {o["stamp"] for v in objs["val"].values() for o in v}
    assert len(ref_stamps) == 4 * bm.SUPPORT_PER_CLASS and not ref_stamps & scene_stamps
    assert any(o["label"] is None for v in objs["val"].values() for o in v)  # unlabelled distractors exist
    for stem, v in objs["val"].items():  # YOLO labels = the labelled objects, same boxes
        rows = np.loadtxt(out / "fold0" / "labels" / "val" / f"{int(stem):06d}.txt", ndmin=2).reshape(-1, 5)
        lab = [o for o in v if o["label"] is not None]
        assert len(rows) == len(lab)
        for r, o in zip(rows, lab):
            x1, y1, x2, y2 = o["box"]
            assert int(r[0]) == o["label"] and abs(r[1] * 96 - (x1 + x2) / 2) < 0.01


def test_instance_scenes_hold_look_alikes(fold):
    out, _, _ = fold
    objs = json.loads((out / "fold0-instance" / "objects_test.json").read_text())
    folders = [{o["stamp"].rsplit("/", 1)[0] for o in v if o["label"] is not None} for v in objs.values()]
    assert all(len(f) == 1 for f in folders)  # target + look-alikes from one folder
    assert any(sum(o["label"] is not None for o in v) >= 2 for v in objs.values())


def test_generation_is_deterministic(fold, tmp_path):
    out, _, _ = fold
    bm.build_fold(synthetic_sources(), tmp_path, 0, size=96, n_train=12, n_val=8, n_novel_train=4, n_instance=6)
    for f in sorted((out / "fold0" / "images" / "val").glob("*.jpg"))[:4]:
        assert f.read_bytes() == (tmp_path / "fold0" / "images" / "val" / f.name).read_bytes()


# -- metrics and baselines ---------------------------------------------------------------------------------------------
def test_fp_on_distractors_counts_only_wrong_objects():
    rb = _tool("run_benchmark")
    objects = {0: [{"box": [0, 0, 10, 10], "label": 0}, {"box": [50, 50, 60, 60], "label": None}], 1: []}
    det = lambda box, c, s=0.9: {"image_id": 0, "category_id": c + 1, "bbox": box, "score": s}  # noqa: E731
    assert rb.fp_on_distractors([det([0, 0, 10, 10], 0)], objects) == 0  # correct
    assert rb.fp_on_distractors([det([50, 50, 10, 10], 0)], objects) == 0.5  # on the unlabelled distractor
    assert rb.fp_on_distractors([det([0, 0, 10, 10], 1)], objects) == 0.5  # wrong class on a labelled object
    assert rb.fp_on_distractors([det([50, 50, 10, 10], 0, 0.1)], objects) == 0  # below the score threshold
    assert rb.fp_on_distractors([det([100, 100, 5, 5], 0)], objects) == 0  # background FP: not a distractor


def test_window_matching_finds_the_reference_object():
    from skimage import data

    from yolo_fewshot.baselines.window_matching import WindowMatcher, sliding_windows
    from yolo_fewshot.encoders import build_encoder

    cup = data.coffee()[40:330, 110:430]
    rng = np.random.default_rng(0)
    scene = cv2.GaussianBlur(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8), (0, 0), 6)
    small = cv2.resize(cup, (96, 87))
    scene[120:207, 140:236] = small
    m = WindowMatcher(build_encoder("efficientnet-lite0"), size=96)
    ref = m.embed(cup, np.array([[0, 0, cup.shape[1], cup.shape[0]]], np.float32))
    win = sliding_windows(256, 256)
    (box, score, cls), *_ = m.detect(win, m.embed(scene, win), ref)
    ix = max(0, min(box[2], 236) - max(box[0], 140)) * max(0, min(box[3], 207) - max(box[1], 120))
    union = (box[2] - box[0]) * (box[3] - box[1]) + 96 * 87 - ix
    assert cls == 0 and ix / union > 0.4 and score > 0.5


# -- the demo ------------------------------------------------------------------------------------------------------
def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    """The demo's default path (data, K-shot validation, predictions with thumbnails, found / false-positive counts,
    report) on synthetic cut-outs, with an untrained prototype model in place of the shipped one; the Debian fetch is
    the one step replaced (the tests stay offline)."""
    from yolo_fewshot import demo

    monkeypatch.setattr(bm, "load_sources", lambda cache, log=print: synthetic_sources())
    out = demo.run_demo(
        model="yolov8n-lite0-proto.yaml", imgsz=64, n_val=8, n_instance=8, project=str(tmp_path), name="demo"
    )
    report = json.loads((out / "results.json").read_text())
    assert [r["shots"] for r in report["validation"]] == [1, 3]
    assert all("coco_novel_mAP50" in r for r in report["validation"])
    found = report["found"]
    assert found["objects"] > 0 and 0 <= found["found"] <= found["objects"]
    assert found["scenes"] == len(report["predictions"]) > 0
    assert len(list((out / "predictions").glob("*.jpg"))) == len(report["predictions"])
    assert cv2.imread(str(out / "demo.jpg")).shape[2] == 3
    assert "novel objects found" in (out / "results.md").read_text()
    assert sorted(p.name for p in (out / "refs").iterdir()) == ["fruit", "vegetables"]
    # instance search: every novel object its own class, one photo each, counted in the same way
    inst = report["instance"]
    assert inst["objects"] > 0 and 0 <= inst["found"] <= inst["objects"] and inst["scenes"] == len(inst["predictions"])
    novel_objects = {p.name for p in (out / "refs-instance").iterdir()}
    assert len(novel_objects) > 2 and all(len(list((out / "refs-instance" / n).iterdir())) == 1 for n in novel_objects)
    assert {d[0] for p in inst["predictions"] for d in p["detections"]} <= novel_objects
    assert "Instance search" in (out / "results.md").read_text()


def test_demo_train_path(tmp_path, monkeypatch):
    """``train=True``: a short episodic run from the YAML, then the same scoring with the trained weights."""
    from yolo_fewshot import demo

    monkeypatch.setattr(bm, "load_sources", lambda cache, log=print: synthetic_sources())
    out = demo.run_demo(
        train=True, epochs=1, imgsz=64, batch=8, n_train=16, n_val=8, n_instance=0, project=str(tmp_path)
    )
    report = json.loads((out / "results.json").read_text())
    assert report["model"].endswith("last.pt") and (out / "train" / "weights" / "last.pt").is_file()
    assert [r["shots"] for r in report["validation"]] == [1, 3]
    # the run's checkpoint carries the COCO centre of its training classes' references (category search)
    from yolo_fewshot.checkpoint import read_checkpoint

    trained = read_checkpoint(out / "train" / "weights" / "last.pt")["model"]
    center = trained.coco_center
    assert center.ndim == 1 and center.shape[0] > 0 and torch.isfinite(center).all()
    # and instance search's hubness bank: the training scenes' labelled objects, embedded as candidates are
    from yolo_fewshot.nn.hubness import check_bank

    assert 0 < check_bank(trained.hubness_bank, trained.proto_dims) <= 1024


def test_found_and_false_positives_on_hand_cases():
    from yolo_fewshot.demo import found_and_false

    truth = {"a.jpg": [("fruit", [0, 0, 10, 10]), ("fruit", [20, 20, 30, 30])], "b.jpg": [("veg", [0, 0, 10, 10])]}
    preds = [
        {"image": "a.jpg", "detections": [["fruit", 0.9, [0, 0, 10, 10]], ["fruit", 0.8, [1, 0, 10, 10]]]},
        {"image": "b.jpg", "detections": [["fruit", 0.7, [0, 0, 10, 10]], ["veg", 0.6, [0, 0, 10, 11]]]},
    ]
    r = found_and_false(preds, truth)
    # a: one hit, the duplicate is a false positive; b: wrong class is a false positive, veg is found
    assert (r["objects"], r["found"], r["false_positives"], r["scenes"]) == (3, 2, 2, 2)
    assert r["found_share"] == round(2 / 3, 4) and r["fp_per_scene"] == 1.0


def test_demo_rejects_unknown_keys():
    from yolo_fewshot.cli import entrypoint

    assert entrypoint(["demo", "epochz=3"]) == 2
    with pytest.raises(ValueError, match="demo does not take"):
        __import__("yolo_fewshot.demo").demo.run_demo(foo=1)


def test_trainer_refuses_all_novel_without_finetune(tmp_path):
    from yolo_fewshot.data.toy import make_dataset
    from yolo_fewshot.engine.train import FewShotTrainer

    y = make_dataset(tmp_path, n_train=2, n_val=1)
    y.write_text(y.read_text().replace("novel: [rocket]", "novel: [cup, cat, face, rocket]"))
    with pytest.raises(ValueError, match="every class is listed as novel"):
        FewShotTrainer(overrides={"model": "yolov8n-psalm-p2.yaml", "data": str(y), "project": str(tmp_path)})


def test_tools_fail_with_one_line(tmp_path, capsys):
    assert _tool("make_benchmark").main(["--folds", "7"]) == 2
    assert "unknown fold [7]" in capsys.readouterr().err
    assert _tool("run_benchmark").main(["--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "fold0.yaml not found; generate it first: python tools/make_benchmark.py --folds 0" in err
    assert "\n" not in err
