"""yolo-fewshot command line: modes, Ultralytics key parsing, one-line errors."""

import shutil
import subprocess

import pytest

from yolo_fewshot.cli import UsageError, entrypoint, parse_args, run


def test_info_runs():
    assert entrypoint(["info", "model=yolov8n-psalm-p2.yaml"]) == 0
    layers, params, grads, flops = run("info", {"model": "yolov8n-cheaf.yaml"})
    assert params > 1e6 and flops > 0


def test_parses_ultralytics_values():
    mode, ov = parse_args(["predict", "model=best.pt", "conf=0.3", "imgsz=[320,256]", "save=True", "classes", "=", "1"])
    assert mode == "predict" and ov == {
        "model": "best.pt",
        "conf": 0.3,
        "imgsz": [320, 256],
        "save": True,
        "classes": 1,
    }


@pytest.mark.parametrize(
    "argv,msg",
    [
        ([], "no mode given"),
        (["fly"], "unknown mode 'fly'"),
        (["info", "confidence=0.3"], "'confidence' is not a valid argument; did you mean conf"),
        (["info", "model"], "is not key=value"),
    ],
)
def test_usage_errors(argv, msg):
    with pytest.raises(UsageError, match=msg):
        parse_args(argv)


def test_errors_are_one_line_with_status_2(capsys):
    assert entrypoint(["info", "model=nope.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("yolo-fewshot: error: model YAML 'nope.yaml' not found") and "\n" not in err
    assert entrypoint(["info", "epochz=3"]) == 2
    capsys.readouterr()
    assert entrypoint(["train", "model=yolov8n-psalm-p2.yaml", "data=missing-fewshot.yaml"]) == 2  # Ultralytics'
    err = capsys.readouterr().err.strip()  # RuntimeError around the missing file: still one line
    assert "missing-fewshot.yaml" in err and "does not exist" in err and "\n" not in err


def test_help_and_version(capsys):
    assert entrypoint(["help"]) == 0 and "usage: yolo-fewshot MODE" in capsys.readouterr().out
    assert entrypoint(["version"]) == 0 and "ultralytics 8.4" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("yolo-fewshot") is None, reason="console script not installed")
def test_console_script():
    r = subprocess.run(["yolo-fewshot", "version"], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("yolo_fewshot ")


def test_refs_folder_on_the_command_line(tmp_path, capsys):
    import cv2
    from skimage import data

    for name, img in (("coffee", data.coffee()), ("cat", data.chelsea())):
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / "1.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    argv = ["info", "model=yolov8n-psalm.yaml", "encoder=efficientnet-lite0", f"refs={tmp_path}"]
    assert entrypoint(argv) == 0
    assert "references: 2 classes ['cat', 'coffee'] (K=[1, 1]) encoded by efficientnet-lite0" in capsys.readouterr().out
    assert entrypoint(["info", "encoder=efficientnet-lite0", f"refs={tmp_path / 'missing'}"]) == 2
    assert "references not found" in capsys.readouterr().err


def test_warnings_are_one_line(tmp_path, capsys):
    import cv2
    import numpy as np

    (tmp_path / "dot").mkdir()
    cv2.imwrite(str(tmp_path / "dot" / "1.png"), np.full((1, 1, 3), 200, np.uint8))  # a 1x1 px reference photo
    assert entrypoint(["info", "model=yolov8n-psalm.yaml", "encoder=efficientnet-lite0", f"refs={tmp_path}"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "1x1 px" in ln]
    assert err and err[0].startswith("yolo-fewshot: warning: reference ") and "larger photo" in err[0]


def test_cli_exports_dynamic_references(tmp_path):
    """``yolo-fewshot export ... dynamic_refs=True`` writes the two-graph export (no references needed), and the key
    is refused outside export with one line."""
    from yolo_fewshot.cli import entrypoint

    args = ["model=yolov8n-lite0-proto.yaml", "format=onnx", "dynamic_refs=True", "imgsz=128", f"project={tmp_path}"]
    assert entrypoint(["export", *args]) == 0
    out = tmp_path / "yolov8n-lite0-proto_dynamic"
    assert (out / "detector.onnx").is_file() and (out / "encoder.onnx").is_file()
    assert entrypoint(["predict", "model=yolov8n-lite0-proto.yaml", "dynamic_refs=True", "source=x.jpg"]) == 2
