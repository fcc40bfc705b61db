"""Safe checkpoint loading: a hostile ``.pt`` is refused before any of its code runs (API and CLI); the plugin's own
checkpoints (trained, with references, fresh process) still load; the opt-out is explicit."""

import fractions
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from yolo_fewshot import FewShotYOLO
from yolo_fewshot.checkpoint import UNSAFE_ENV, UnsafeCheckpointError, plugin_class, read_checkpoint
from yolo_fewshot.data.toy import make_dataset

REPO = Path(__file__).resolve().parents[1]
SOURCE_ENV = {k: v for k, v in {**os.environ, "PYTHONPATH": str(REPO)}.items() if k != UNSAFE_ENV}


class _System:
    """Pickles as ``os.system(command)``: what a hostile checkpoint carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Exec:
    """Pickles as ``exec(code)``."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def hostile(path: Path, marker: Path, kind: str = "system") -> Path:
    """A ``.pt`` whose unpickling would create ``marker``."""
    if kind == "system":
        torch.save({"model": _System(f"touch {marker}")}, path)
    elif kind == "exec":
        torch.save({"model": _Exec(f"open({str(marker)!r}, 'w').close()")}, path)
    else:  # a raw pickle, not a torch.save archive
        path.write_bytes(pickle.dumps({"model": _System(f"touch {marker}")}))
    assert not marker.exists()
    return path


@pytest.fixture(scope="module")
def best(tmp_path_factory):
    """A 1-epoch toy model trained the way tests/test_train.py trains: our own checkpoint."""
    data = make_dataset(tmp_path_factory.mktemp("fsd"), n_train=12, n_val=4)
    project = tmp_path_factory.mktemp("runs")
    FewShotYOLO("yolov8n-psalm.yaml", encoder="efficientnet-lite0").train(
        data=str(data), project=str(project), name="t", epochs=1, imgsz=64, batch=4, workers=0, plots=False,
        device="cpu", n_way=2, shots="1", val=False, verbose=False,
    )  # fmt: skip
    return project / "t" / "weights" / "best.pt"


@pytest.mark.parametrize("kind", ["system", "exec", "raw"])
def test_hostile_checkpoint_is_refused_through_the_api(tmp_path, kind):
    marker = tmp_path / "PWNED"
    evil = hostile(tmp_path / "evil.pt", marker, kind)
    with pytest.raises(UnsafeCheckpointError) as e:
        FewShotYOLO(evil)
    msg = str(e.value)
    assert not marker.exists()  # the payload never ran
    assert msg.startswith(f"refused to load {evil}") and "\n" not in msg and "unsafe_load=True" in msg
    if kind != "raw":
        assert ("posix.system" if kind == "system" else "builtins.exec") in msg


def test_hostile_checkpoint_is_refused_through_the_cli(tmp_path):
    marker = tmp_path / "PWNED"
    evil = hostile(tmp_path / "evil.pt", marker)
    r = subprocess.run(
        [sys.executable, "-m", "yolo_fewshot.cli", "predict", f"model={evil}", "source=scene.jpg", "refs=refs/"],
        capture_output=True, text=True, env=SOURCE_ENV, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert not marker.exists()
    err = r.stderr.strip()
    assert err.startswith(f"yolo-fewshot: error: refused to load {evil}: its pickle names posix.system")
    assert "\n" not in err and "Traceback" not in r.stderr


def test_our_trained_checkpoint_loads_safely_in_a_fresh_process(best, tmp_path):
    code = textwrap.dedent(f"""
        import torch
        from skimage import data
        from yolo_fewshot import FewShotYOLO
        m = FewShotYOLO(r"{best}")
        m.set_references({{"cat": [data.chelsea()]}})
        y = m.model.eval()(torch.rand(1, 3, 64, 64))[0]
        m.save(r"{tmp_path / "with_refs.pt"}")  # reference thumbnails (numpy arrays) travel in the pickle
        again = FewShotYOLO(r"{tmp_path / "with_refs.pt"}")
        print("ok", y.shape[1], again.names, list(again.model.reference_thumbnails))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=SOURCE_ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok 5 {0: 'cat'} ['cat']" in r.stdout
    assert read_checkpoint(best)["epoch"] == -1  # yolo_fewshot's own reads are safe loads too


def test_foreign_global_in_our_checkpoint_is_refused_unless_opted_out(best, tmp_path, monkeypatch):
    ckpt = torch.load(best, weights_only=False)  # our own file, read by the test itself
    ckpt["note"] = fractions.Fraction(1, 3)  # harmless, but no checkpoint of ours or Ultralytics' holds it
    torch.save(ckpt, tmp_path / "foreign.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"its pickle names fractions\.Fraction"):
        FewShotYOLO(tmp_path / "foreign.pt")
    assert FewShotYOLO(tmp_path / "foreign.pt", unsafe_load=True).ckpt["note"] == fractions.Fraction(1, 3)
    with pytest.raises(UnsafeCheckpointError):  # the opt-out was for that call only
        FewShotYOLO(tmp_path / "foreign.pt")
    monkeypatch.setenv(UNSAFE_ENV, "1")
    assert FewShotYOLO(tmp_path / "foreign.pt").ckpt["note"] == fractions.Fraction(1, 3)


def test_the_allowlist_holds_plugin_classes_only():
    from yolo_fewshot.encoders.base import EncoderSpec
    from yolo_fewshot.nn.detector import FewShotDetectionModel

    assert plugin_class("yolo_fewshot.nn.detector.FewShotDetectionModel") is FewShotDetectionModel
    assert plugin_class("yolo_fewshot.encoders.base.EncoderSpec") is EncoderSpec  # a dataclass
    assert plugin_class("yolo_fewshot.atomic.write_atomic") is None  # a function: it could write files
    assert plugin_class("yolo_fewshot.nn.detector.DetectionModel") is None  # imported from Ultralytics, not ours
    assert plugin_class("yolo_fewshot.encoders.hf.HFEncoder") is None  # builds from the network
    assert plugin_class("os.system") is None and plugin_class("yolo_fewshot.nope.X") is None
