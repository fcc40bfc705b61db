"""The real-photo evaluation set: its manifest, loader, protocol and the SIFT baseline (offline: nothing is fetched)."""

import hashlib
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolo_fewshot.data.realphoto import (
    COLUMNS,
    FetchError,
    Package,
    box_iou,
    load_manifest,
    load_pairs,
    parse_row,
    read_video_frame,
    summarize,
    top_box,
    top_hit,
)

TOOL = Path(__file__).resolve().parents[1] / "tools" / "run_realphoto.py"


def _tool():
    spec = importlib.util.spec_from_file_location("run_realphoto", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the committed manifest --------------------------------------------------------------------------------------------
def test_manifest_rows_are_valid():
    specs = load_manifest()
    assert len({s.id for s in specs}) == len(specs)
    for s in specs:
        for src in (s.ref, s.scene):
            assert len(src.sha256) == 64 and int(src.sha256, 16) >= 0
            assert src.package.registry in ("debian", "pypi", "npm") and src.package.version
            assert not Path(src.file).is_absolute() and ".." not in Path(src.file).parts
        boxes = [(b, s.scene.size) for b in s.targets] + ([(s.ref_box, s.ref.size)] if s.ref_box else [])
        for (x1, y1, x2, y2), (w, h) in boxes:
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, s.id
            assert (x2 - x1) >= 8 and (y2 - y1) >= 8, s.id  # nothing too small to be checked by eye
        assert s.description and s.category


def test_manifest_meets_the_issue():
    specs = load_manifest()
    n = len(specs)
    kinds = [s.kind for s in specs]
    non_coco = sum(not s.coco for s in specs)
    assert n >= 30
    assert kinds.count("instance") >= 10 and kinds.count("category") >= 10
    assert 0.4 <= non_coco / n <= 0.6  # about half the pairs are objects outside COCO's 80 classes
    assert sum(s.kind == "instance" and not s.coco for s in specs) >= 5
    assert sum(s.kind == "category" and not s.coco for s in specs) >= 5
    # same-instance pairs are two different photographs, never one file cropped twice
    assert all(s.ref.path != s.scene.path for s in specs)


def _row(**kw) -> list[str]:
    f = {
        "id": "p",
        "kind": "instance",
        "coco": "no",
        "category": "poster",
        "ref_package": "debian:pkg=1.0-1",
        "ref_path": "usr/share/a.png",
        "ref_sha256": "a" * 64,
        "ref_size": "100x80",
        "ref_box": "10,10,50,40",
        "scene_package": "npm:@scope/pkg@2.0.0",
        "scene_path": "assets/b.jpg",
        "scene_sha256": "b" * 64,
        "scene_size": "200x100",
        "targets": "1,2,30,40;100,10,199,99",
        "description": "d",
    }
    f.update(kw)
    return [f[c] for c in COLUMNS]


def test_parse_row_and_its_errors():
    s = parse_row(_row())
    assert s.ref_box == (10, 10, 50, 40) and s.targets == ((1, 2, 30, 40), (100, 10, 199, 99))
    assert s.scene.package == Package("npm", "@scope/pkg", "2.0.0") and s.ref.size == (100, 80)
    for bad, match in [
        ({"ref_sha256": "a" * 63}, "sha256"),
        ({"kind": "both"}, "kind"),
        ({"coco": "maybe"}, "coco"),
        ({"ref_box": "10,10,5,40"}, "x2 > x1"),
        ({"targets": "1,2,30,40;100,10,201,99"}, "outside the 200x100"),
        ({"targets": ""}, "no target"),
        ({"ref_size": "100"}, "WIDTHxHEIGHT"),
        ({"scene_path": "a.avi#time=3"}, "frame=N"),
        ({"ref_package": "conda:x=1"}, "expected debian"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_row(_row(**bad))
    with pytest.raises(ValueError, match="columns"):
        parse_row(_row()[:-1])


def test_package_specs():
    assert Package.parse("debian:plasma-workspace-wallpapers=4:5.27.5-2") == Package(
        "debian", "plasma-workspace-wallpapers", "4:5.27.5-2"
    )
    assert Package.parse("pypi:scikit-image==0.26.0") == Package("pypi", "scikit-image", "0.26.0")
    assert str(Package.parse("npm:tracking@1.1.3")) == "npm:tracking@1.1.3"
    with pytest.raises(ValueError):
        Package.parse("pypi:scikit-image=0.26.0")


# -- the protocol ------------------------------------------------------------------------------------------------------
def test_top_detection_metric():
    targets = np.array([[10, 10, 50, 50], [100, 100, 140, 180]], np.float32)
    assert box_iou([10, 10, 50, 50], targets)[0] == pytest.approx(1.0)
    assert top_hit([12, 12, 52, 52], targets)  # IoU 0.82
    assert not top_hit([30, 30, 70, 70], targets)  # IoU 400 / 2800 = 0.14
    assert top_hit([100, 100, 140, 140], targets)  # exactly 0.5 with the second target counts
    assert not top_hit([100, 100, 139, 140], targets)
    assert not top_hit(None, targets)
    boxes = np.array([[0, 0, 5, 5], [11, 11, 50, 50], [100, 100, 140, 180]], np.float32)
    assert top_box(boxes, np.array([0.9, 0.2, 0.5])).tolist() == [0, 0, 5, 5]  # only the top box is scored
    assert not top_hit(top_box(boxes, np.array([0.9, 0.2, 0.5])), targets)
    assert top_hit(top_box(boxes, np.array([0.1, 0.2, 0.5])), targets)
    assert top_box(np.zeros((0, 4)), np.zeros(0)) is None


def test_summarize_splits():
    specs = [parse_row(_row(id=str(i), kind=k, coco=c)) for i, (k, c) in enumerate(
        [("instance", "yes"), ("instance", "no"), ("category", "yes"), ("category", "no")])]  # fmt: skip
    s = summarize([True, False, True, True], specs)
    assert s["all"] == {"found": 3, "pairs": 4, "rate": 0.75}
    assert (s["instance"]["found"], s["category"]["found"]) == (1, 2)
    assert (s["coco"]["rate"], s["non-coco"]["rate"]) == (1.0, 0.5)


# -- loading from a package cache (prepared by hand: no fetch) ---------------------------------------------------------
def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_load_pairs_from_cache(tmp_path):
    root = tmp_path / "debian" / "fakepkg"
    (root / "img").mkdir(parents=True)
    (root / ".extracted").write_text("fakepkg_1.0_all.deb\n")  # what fetch_debian leaves: no download happens
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[10:30, 20:50] = (255, 0, 0, 255)  # an opaque red cut-out, transparent elsewhere
    cv2.imwrite(str(root / "img" / "ref.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    scene = np.full((50, 80, 3), 200, np.uint8)
    cv2.imwrite(str(root / "img" / "scene.png"), scene)
    row = _row(
        ref_package="debian:fakepkg=1.0",
        ref_path="img/ref.png",
        ref_sha256=_sha(root / "img" / "ref.png"),
        ref_size="60x40",
        ref_box="",
        scene_package="debian:fakepkg=1.0",
        scene_path="img/scene.png",
        scene_sha256=_sha(root / "img" / "scene.png"),
        scene_size="80x50",
        targets="5,5,40,30",
    )
    manifest = tmp_path / "m.tsv"
    manifest.write_text("# comment\n" + "\t".join(COLUMNS) + "\n" + "\t".join(row) + "\n")
    (pair,) = load_pairs(manifest=manifest, cache=tmp_path, log=lambda s: None)
    assert pair.ref_box.tolist() == [20, 10, 50, 30]  # the alpha's extent
    assert pair.ref_image[0, 0].tolist() == [114, 114, 114] and pair.ref_image[20, 30].tolist() == [255, 0, 0]
    assert pair.ref_mask.shape == (40, 60) and pair.scene.shape == (50, 80, 3)
    assert pair.targets.tolist() == [[5, 5, 40, 30]] and pair.kind == "instance" and not pair.coco

    manifest.write_text("\t".join(COLUMNS) + "\n" + "\t".join(row).replace(_sha(root / "img" / "scene.png"), "c" * 64))
    with pytest.raises(FetchError, match="sha256"):
        load_pairs(manifest=manifest, cache=tmp_path, log=lambda s: None)
    with pytest.raises(KeyError, match="nope"):
        load_pairs(["nope"], manifest=manifest, cache=tmp_path)


def test_video_frames_are_decoded_in_order(tmp_path):
    path = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG")
    for v in (0, 100, 200):
        writer.write(np.full((24, 32, 3), v, np.uint8))
    writer.release()
    means = [read_video_frame(path, i).mean() for i in range(3)]
    assert np.allclose(means, [0, 100, 200], atol=4)  # MJPG is lossy; the order is exact
    with pytest.raises(ValueError, match="no frame 3"):
        read_video_frame(path, 3)


# -- the SIFT + RANSAC baseline ----------------------------------------------------------------------------------------
def _pattern(rng: np.random.Generator, w: int = 160, h: int = 120) -> np.ndarray:
    """A textured planar object: random rectangles and circles on noise."""
    img = rng.integers(60, 200, (h, w, 3), dtype=np.uint8)
    for _ in range(25):
        x, y = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(5, 40)), y + int(rng.integers(5, 40))), colour, -1)
        else:
            cv2.circle(img, (x, y), int(rng.integers(3, 15)), colour, -1)
    return img


def test_sift_finds_a_planar_pattern_pasted_with_a_homography():
    rng = np.random.default_rng(0)
    pattern = _pattern(rng)
    scene = cv2.GaussianBlur(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8), (0, 0), 3)
    for _ in range(15):  # clutter that is not the pattern
        other = _pattern(rng, 60, 50)
        x, y = int(rng.integers(0, 420)), int(rng.integers(0, 310))
        scene[y : y + 50, x : x + 60] = other
    h, w = pattern.shape[:2]
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    quad = np.float32([[220, 90], [390, 120], [370, 260], [210, 230]])  # rotated, scaled, slanted
    hom = cv2.getPerspectiveTransform(corners, quad)
    warped = cv2.warpPerspective(pattern, hom, (480, 360))
    inside = cv2.warpPerspective(np.full((h, w), 255, np.uint8), hom, (480, 360)) > 127
    scene[inside] = warped[inside]
    truth = np.array([quad[:, 0].min(), quad[:, 1].min(), quad[:, 0].max(), quad[:, 1].max()])

    tool = _tool()
    box, inliers = tool.sift_homography(pattern, [0, 0, w, h], scene)
    assert box is not None and inliers >= 20
    assert box_iou(box, truth[None])[0] > 0.9

    boxes, scores = tool.SiftMethod()(pattern, [0, 0, w, h], None, scene)
    assert top_hit(top_box(boxes, scores), truth[None])
    lone = _pattern(np.random.default_rng(1))  # an object that is not in the scene: no box
    assert tool.sift_homography(lone, [0, 0, w, h], scene)[0] is None
