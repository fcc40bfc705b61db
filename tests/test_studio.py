"""The reference studio: its logic (bad uploads, boxes -> references, bank round trip, detection, export, command)
and the page itself, driven in headless Chromium (skipped where Chromium, Playwright or the studio extra is absent)."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from yolo_fewshot import FewShotYOLO
from yolo_fewshot.references.bank import ReferenceBank
from yolo_fewshot.studio.command import DEFAULTS, parse
from yolo_fewshot.studio.logic import (
    DEFAULT_MODEL,
    EXPORT_KINDS,
    Studio,
    StudioError,
    annotation_box,
    check_box,
    one_line,
)

CAT_IN_SCENE = (200, 100, 425, 250)  # where the cat is pasted into the gravel scene (xyxy px)
CAT_BOX = (100, 20, 350, 290)  # the cat's head and body in skimage's chelsea (451 x 300)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A cat photo, a scene with the cat pasted on gravel, a folder of scenes, a short video, and two bad uploads."""
    d = tmp_path_factory.mktemp("studio_files")
    cat = data.chelsea()
    cv2.imwrite(str(d / "cat.png"), cat[..., ::-1])
    scene = cv2.resize(np.stack([data.gravel()] * 3, -1), (640, 480))
    x1, y1, x2, y2 = CAT_IN_SCENE
    scene[y1:y2, x1:x2] = cv2.resize(cat, (x2 - x1, y2 - y1), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(d / "scene.png"), scene[..., ::-1])
    (d / "scenes").mkdir()
    cv2.imwrite(str(d / "scenes" / "a.png"), scene[..., ::-1])
    cv2.imwrite(str(d / "scenes" / "b.jpg"), np.ascontiguousarray(scene[:, ::-1, ::-1]))
    video = cv2.VideoWriter(str(d / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 5, (320, 240))
    for i in range(6):
        video.write(np.ascontiguousarray(cv2.resize(np.roll(scene, 20 * i, axis=1), (320, 240))[..., ::-1]))
    video.release()
    (d / "notes.txt").write_text("not a picture")
    (d / "fake.png").write_bytes(b"this is text with an image's name")
    return {p.stem if p.is_file() else p.name: p for p in d.iterdir()}


@pytest.fixture
def studio(tmp_path) -> Studio:
    return Studio(DEFAULT_MODEL, tmp_path / "work", threads=1)


def _protos(model: FewShotYOLO) -> list[torch.Tensor]:
    return [p.clone() for p in model.model.prototypes]


def _assert_one_line(msg: str) -> None:
    assert msg and "\n" not in msg and "Traceback" not in msg, msg


# -- bad uploads -------------------------------------------------------------------------------------------------------
def test_bad_uploads_are_one_line_and_lose_nothing(studio, files):
    studio.enqueue([files["cat"]])
    studio.add_current("cat", CAT_BOX)
    studio.enqueue([files["cat"]])  # one photo waits for its box
    before = (list(studio.references), list(studio.pending))
    for bad in (files["notes"], files["fake"]):
        with pytest.raises(StudioError) as e:
            studio.enqueue([bad])
        _assert_one_line(str(e.value))
        assert bad.name in str(e.value) and "not an image" in str(e.value)
        assert str(bad.parent) not in str(e.value)  # the file's name, not the server's temporary path
    assert (studio.references, studio.pending) == before
    msg = studio.enqueue([files["notes"], files["cat"]])  # good files are queued, bad ones named
    _assert_one_line(msg)
    assert "skipped notes.txt" in msg and len(studio.pending) == 2
    with pytest.raises(StudioError, match="is not an image"):
        studio.add_reference(files["fake"], "cat")
    with pytest.raises(StudioError, match="not a bank"):
        studio.load_bank(files["notes"])
    fake_bank = files["notes"].with_name("fake.safetensors")
    fake_bank.write_bytes(b"garbage")
    with pytest.raises(StudioError, match="cannot read reference bank") as e:
        studio.load_bank(fake_bank)
    _assert_one_line(str(e.value))
    assert studio.references == before[0] and studio.loaded is None


def test_zero_area_box_missing_name_and_no_references(studio, files):
    with pytest.raises(StudioError, match="no references yet") as e:
        studio.detect(str(files["scene"]))
    _assert_one_line(str(e.value))
    with pytest.raises(StudioError, match="no photo to add"):
        studio.add_current("cat")
    studio.enqueue([files["cat"]])
    with pytest.raises(StudioError, match="zero area") as e:
        studio.add_current("cat", (120, 40, 120, 200))
    _assert_one_line(str(e.value))
    with pytest.raises(StudioError, match="zero area"):
        studio.add_current("cat", (500, 10, 600, 100))  # wholly outside the 451 x 300 photo
    with pytest.raises(StudioError, match="name the class"):
        studio.add_current("  ", CAT_BOX)
    with pytest.raises(StudioError, match="add a reference photo of 'cat' first"):
        studio.add_current("cat", CAT_BOX, negative=True)
    assert studio.references == [] and len(studio.pending) == 1  # the photo still waits for a good box
    studio.add_current("cat", CAT_BOX)
    with pytest.raises(StudioError, match="no scene"):
        studio.detect("  ")
    with pytest.raises(StudioError, match="does not exist"):
        studio.detect(str(files["cat"].with_name("missing.png")))
    with pytest.raises(StudioError, match="not an image"):
        studio.detect(str(files["notes"]))


def test_box_helpers():
    assert annotation_box(None) is None
    assert annotation_box({"image": None, "boxes": []}) is None
    box = {"xmin": 10, "ymin": 20, "xmax": 110, "ymax": 220, "label": "object"}
    assert annotation_box({"image": None, "boxes": [box]}) == (10.0, 20.0, 110.0, 220.0)
    with pytest.raises(StudioError, match="not four numbers"):
        annotation_box({"boxes": [{"xmin": 1}]})
    assert check_box(None, 100, 50) is None
    assert check_box((90, 40, -5, 60), 100, 50) == (0.0, 40.0, 90.0, 50.0)  # corners in any order, clipped
    with pytest.raises(StudioError, match="finite"):
        check_box((0, 0, float("nan"), 5), 100, 50)
    assert one_line(ValueError("first\nsecond")) == "first" and one_line(KeyError()) == "KeyError"


# -- references --------------------------------------------------------------------------------------------------------
def test_box_becomes_the_api_reference(studio, files):
    """A photo + box added on the page gives the prototypes FewShotYOLO.set_references gives for the same photo + box;
    a photo without a box is the whole photo; a video frame is a reference too."""
    studio.enqueue([files["cat"], files["cat"], files["clip"]])
    studio.add_current("cat", CAT_BOX)
    studio.add_current("Cat")  # same class (names are case-insensitive), whole photo
    assert len(studio.pending) == 1 and studio.current[3] == 6  # the video waits, 6 frames
    studio.select_frame(3)
    frame, source, index, _ = studio.current
    assert index == 3 and source == "clip.mp4 frame 3"
    studio.add_current("gravel", negative=False)
    assert len(studio.pending) == 1  # a video stays queued for more frames
    bank = studio.bank()
    assert bank.names == ["cat", "gravel"] and [c.k for c in bank.classes.values()] == [2, 1]
    assert [s["file"] for s in bank.classes["cat"].sources] == ["cat.png", "cat.png"]
    assert bank.classes["cat"].sources[0]["box"] == list(map(float, CAT_BOX))
    api = FewShotYOLO(DEFAULT_MODEL)
    api.set_references({"cat": [(str(files["cat"]), CAT_BOX), str(files["cat"])], "gravel": [frame]})
    for a, b in zip(_protos(api), _protos(studio.model)):
        assert torch.equal(a, b)
    assert studio.model.model.names == {0: "cat", 1: "gravel"}
    assert [caption for _, caption in studio.gallery()] == ["cat: cat.png", "cat: cat.png", "gravel: clip.mp4 frame 3"]
    assert studio.remove(2) == "gravel: clip.mp4 frame 3" and len(studio.gallery()) == 2
    assert studio.skip().startswith("skipped clip.mp4") and studio.current is None


def test_bank_save_load_round_trip(studio, files, tmp_path):
    studio.enqueue([files["cat"], files["scene"]])
    studio.add_current("cat", CAT_BOX)
    studio.add_current("cat", (50, 50, 250, 200), negative=True)  # gravel: a look-alike that is not the cat
    path = studio.save_bank(tmp_path / "banks" / "cat.safetensors")
    assert path.is_file()
    saved = ReferenceBank.load(path)
    for a, b in zip(saved.prototypes(), studio.bank().prototypes()):
        assert torch.equal(a, b)
    assert saved.classes["cat"].negatives[0].shape[0] == 1 and saved.classes["cat"].negative_sources[0]["file"]
    api = FewShotYOLO(DEFAULT_MODEL)
    api.set_references(str(path))
    for a, b in zip(_protos(api), _protos(studio.model)):
        assert torch.equal(a, b)
    assert api.model.names == studio.model.model.names == {0: "cat"}

    other = Studio(DEFAULT_MODEL, tmp_path / "other", threads=1)  # load it in a new studio, add to it, save again
    other.enqueue([files["cat"]])
    other.add_current("dog")
    other.load_bank(path)  # replaces what was there
    assert other.class_names == ["cat"] and other.references == []
    assert other.gallery()[0][1] == "cat: bank, K=1, 1 negative(s)" and other.gallery()[0][0].shape == (64, 64, 3)
    other.enqueue([files["cat"]])
    other.add_current("cat")  # a second reference of the loaded class
    again = ReferenceBank.load(other.save_bank(tmp_path / "again.safetensors"))
    assert again.classes["cat"].k == 2 and again.classes["cat"].negatives[0].shape[0] == 1
    assert torch.equal(again.classes["cat"].embeddings[0][:1], saved.classes["cat"].embeddings[0])
    with pytest.raises(StudioError, match="ends in .safetensors"):
        other.save_bank(tmp_path / "bank.pt")


# -- detection ---------------------------------------------------------------------------------------------------------
def test_detect_slider_folder_and_video(studio, files):
    studio.enqueue([files["cat"]])
    studio.add_current("cat", CAT_BOX)
    view = studio.detect(str(files["scene"]), conf=0.001)
    assert view.rows and {r[2] for r in view.rows} == {"cat"} and view.video is None
    scene = cv2.imread(str(files["scene"]))
    direct = studio.model.predict(scene, conf=0.001, verbose=False)[0].boxes  # the rows are the API's detections
    assert sorted(r[3] for r in view.rows) == pytest.approx(sorted(direct.conf.tolist()), abs=1e-4)
    (picture, caption), *_ = view.gallery
    assert picture.shape == (480, 640, 3) and caption.startswith("scene.png")
    assert np.abs(picture.astype(int) - scene[..., ::-1]).max() > 100  # boxes and thumbnails are drawn
    t = sorted(r[3] for r in view.rows)[len(view.rows) // 2]
    kept = studio.view(t).rows  # the slider filters without running the model
    assert kept and all(r[3] >= t - 1e-4 for r in kept) and all(r in view.rows for r in kept)
    assert studio.view(1.0).rows == []
    assert len(studio.detect(str(files["scenes"]), 0.001).gallery) == 2  # a folder on the server
    clip = studio.detect(str(files["clip"]), 0.001)
    assert {r[1] for r in clip.rows} <= set(range(6)) and len(clip.gallery) == 6
    assert clip.video is not None and clip.video.stat().st_size > 0


@pytest.mark.slow
def test_export_baked_onnx(studio, files):
    import onnx

    studio.enqueue([files["cat"]])
    studio.add_current("cat", CAT_BOX)
    studio.detect(str(files["scene"]), 0.001)  # exporting after predicting (the exporter fuses the model)
    with pytest.raises(StudioError, match="multiple of 32"):
        studio.export(EXPORT_KINDS[0], 100)
    f = studio.export(EXPORT_KINDS[0], 320)
    assert f.is_file() and f.parent == (studio.workdir / "export").resolve()
    meta = {p.key: p.value for p in onnx.load(str(f), load_external_data=False).metadata_props}
    assert meta["yolo_fewshot_references"] == '["cat"]'
    assert studio.detect(str(files["scene"]), 0.001).rows  # the studio still detects after exporting


# -- command -----------------------------------------------------------------------------------------------------------
def test_command_keys(capsys):
    from yolo_fewshot.cli import entrypoint

    assert parse([]) == DEFAULTS and DEFAULTS["host"] == "127.0.0.1"
    assert parse(["model=best.pt", "port=8000", "host=0.0.0.0"])["port"] == 8000
    for bad, why in (["prot=1"], "takes only"), (["port=x"], "not a number"), (["port=0"], "1..65535"), (["x"], "key"):
        with pytest.raises(ValueError, match=why):
            parse(bad)
    for model, why in ("missing.pt", "no such checkpoint"), ("best.onnx", "model YAML or a .pt"):
        with pytest.raises(StudioError, match=why):
            Studio(model)
    assert entrypoint(["studio", "prot=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yolo-fewshot: error: studio takes only") and err.count("\n") == 1


# -- the page in a real browser ----------------------------------------------------------------------------------------
def _browser_missing() -> str | None:
    for module, extra in (("gradio", "studio"), ("gradio_image_annotation", "studio"), ("playwright", "dev")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -c constraints.txt '.[{extra}]')"
    if not shutil.which("chromium") and not Path("/usr/bin/chromium").exists():
        return "Chromium is not installed (Debian: apt-get install -y chromium chromium-driver)"
    return None


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_message(page, text: str, timeout_s: float = 60) -> str:
    """The page's message line once it contains ``text`` and the event is over (fails with the line it shows)."""
    loc = page.locator("#message")
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        shown = loc.inner_text().strip()
        if text in shown and "processing" not in shown:  # the progress note shows inside the message while it runs
            return shown
        time.sleep(0.2)
    raise AssertionError(f"the page never said '{text}'; it says: {loc.inner_text().strip()!r}")


@pytest.mark.slow
def test_page_in_headless_chromium(files, tmp_path):
    """Upload a bad file and a reference photo, drag a box, name it, detect in a scene, check the detection is drawn
    and listed, save the bank, and load it back through the API with identical prototypes."""
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    from yolo_fewshot.studio.app import launch

    port = _free_port()
    page_app, studio = launch(DEFAULT_MODEL, "127.0.0.1", port, tmp_path / "work", threads=1, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"),  # a fresh --user-data-dir
                executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                args=CHROMIUM_FLAGS,
                viewport={"width": 1400, "height": 1300},
            )
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#message")

            page.locator("#ref-files input[type=file]").set_input_files(str(files["notes"]))
            shown = _wait_message(page, "not an image")
            _assert_one_line(shown)
            assert "Error" not in page.locator("body").inner_text()  # no error toast, no stack trace

            page.locator("#ref-files input[type=file]").set_input_files(str(files["cat"]))
            _wait_message(page, "draw a box on cat.png")
            canvas = page.locator("#annotator canvas")
            canvas.wait_for()
            page.wait_for_timeout(500)
            c = canvas.bounding_box()
            page.mouse.move(c["x"] + c["width"] * 0.35, c["y"] + c["height"] * 0.15)
            page.mouse.down()
            page.mouse.move(c["x"] + c["width"] * 0.5, c["y"] + c["height"] * 0.5, steps=5)
            page.mouse.move(c["x"] + c["width"] * 0.65, c["y"] + c["height"] * 0.85, steps=5)
            page.mouse.up()
            page.locator("#class-name textarea, #class-name input").first.fill("cat")
            page.click("#add")
            added = _wait_message(page, "added cat")
            assert "box " in added and "whole photo" not in added
            assert page.locator("#refs img").count() == 1

            page.locator("#scene-file input[type=file]").set_input_files(str(files["scene"]))
            page.wait_for_selector("#scene-file >> text=scene.png")
            number = page.locator("#conf input[type=number]")
            number.fill("0.001")
            number.press("Enter")
            page.click("#detect")
            found = _wait_message(page, "detection(s) of cat")
            n = int(found.split("detection(s)")[0].split()[-1])
            assert n >= 1
            rows = page.locator("#detections [role=row]")  # a header row, then one per detection
            assert rows.count() == n + 1 and rows.nth(1).inner_text().split()[:3] == ["scene.png", "0", "cat"]
            img = page.locator("#result img").first
            img.wait_for()
            drawn = cv2.imdecode(np.frombuffer(page.request.get(img.get_attribute("src")).body(), np.uint8), 1)
            scene = cv2.imread(str(files["scene"]))
            assert drawn.shape == scene.shape and np.abs(drawn.astype(int) - scene).max() > 100
            page.screenshot(path=str(tmp_path / "studio.png"), full_page=True)

            number.fill("1")  # the slider filters what is shown, without running the model again
            number.press("Enter")
            _wait_message(page, "0 detection(s) at confidence ≥ 1")

            bank_path = tmp_path / "saved" / "cat.safetensors"
            page.locator("#bank-path textarea, #bank-path input").first.fill(str(bank_path))
            page.click("#save")
            _wait_message(page, "saved 1 class(es) (cat K=1)")
            browser.close()
    finally:
        page_app.close()
    bank = ReferenceBank.load(bank_path)
    box = bank.classes["cat"].sources[0]["box"]
    assert 0 <= box[0] < box[2] <= 451 and 0 <= box[1] < box[3] <= 300
    assert 0.1 < (box[2] - box[0]) * (box[3] - box[1]) / (451 * 300) < 0.9  # the dragged box, not the whole photo
    loaded = FewShotYOLO(DEFAULT_MODEL)
    loaded.set_references(str(bank_path))
    from_photo = FewShotYOLO(DEFAULT_MODEL)
    from_photo.set_references({"cat": [(str(files["cat"]), box)]})
    for a, b, c in zip(_protos(loaded), _protos(studio.model), _protos(from_photo)):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_studio_import_is_light():
    """``import yolo_fewshot.studio`` (and the command's parsing) import neither Gradio nor the page."""
    import subprocess
    import sys

    code = (
        "import sys, yolo_fewshot.studio.command\n"
        "print(*(m in sys.modules for m in ('gradio', 'yolo_fewshot.studio.app')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
