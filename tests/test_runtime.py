"""Dynamic-references export (images + prototypes inputs, encoder.onnx) and the torch-free runtime."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from skimage import data
from ultralytics.utils.nms import non_max_suppression

from yolo_fewshot import FewShotYOLO
from yolo_fewshot.runtime.onnx import FewShotOnnx, nms

REPO = Path(__file__).resolve().parents[1]
REFS = {"cat": [data.chelsea()], "cup": [data.coffee(), data.coffee()[::-1].copy()]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    m = FewShotYOLO("yolov8n-psalm-p2.yaml", encoder="efficientnet-lite0")
    out = tmp_path_factory.mktemp("dyn")
    det = Path(m.export(format="onnx", dynamic_refs=True, imgsz=64, project=str(out)))
    return m, det, det.with_name("encoder.onnx")


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("b", [1, 2])
def test_detector_graph_takes_any_number_of_classes(exported, n, b):
    m, det, _ = exported
    sess = ort.InferenceSession(str(det), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images", "prototypes"]
    dims = m.model.proto_dims
    protos = torch.randn(n, 1, sum(dims))
    x = torch.rand(b, 3, 64, 64)
    m.model.set_prototypes([p for p in torch.split(protos, dims, -1)])
    with torch.no_grad():
        yt = m.model.eval()(x)[0]
    yo = sess.run(None, {"images": x.numpy(), "prototypes": protos.numpy()})[0]
    assert yo.shape == (b, 4 + n, yt.shape[-1])
    np.testing.assert_allclose(yo, yt.numpy(), atol=1e-4, rtol=1e-4)


def test_runtime_references_and_detections_match_torch(exported):
    m, det, enc = exported
    rt = FewShotOnnx(det, enc)
    rt.set_references(REFS)
    m.set_references(REFS)
    torch_protos = torch.cat([p[0] for p in m.model.prototypes], -1).numpy()
    np.testing.assert_allclose(rt.prototypes, torch_protos, atol=1e-4, rtol=1e-4)
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)  # imgsz: letterbox is the identity
    with torch.no_grad():
        yt = m.model.eval()(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)[0]
    top = yt[:, 4:].max(1).values.flatten().sort().values[-60:]
    gap = int((top[1:] - top[:-1]).argmax())
    thr = float(top[gap] + top[gap + 1]) / 2  # a threshold no score sits near: agreement must give equal detections
    ref = non_max_suppression(yt, conf_thres=thr, iou_thres=0.7)[0].numpy()
    ref[:, :4] = ref[:, :4].clip(0, 64)  # boxes clipped to the image, as Ultralytics' predictor does when scaling
    got = np.array([[*d["box"], d["score"], d["class"]] for d in rt.predict(img, conf=thr, iou=0.7)]).reshape(-1, 6)
    assert len(ref) > 0 and len(got) == len(ref)
    order = lambda a: a[np.lexsort((a[:, 0], a[:, 5], -a[:, 4]))]  # noqa: E731
    np.testing.assert_allclose(order(got), order(ref), atol=1e-3)
    assert nms(np.zeros((6, 10), np.float32), 0.5, 0.7, 300).shape == (0, 6)


def test_runtime_input_checks(exported, tmp_path):
    _, det, enc = exported
    rt = FewShotOnnx(det, enc)
    with pytest.raises(ValueError, match=r"prototypes have shape \[2, 1, 10\]; this detector takes \[N, 1, 496\]"):
        rt.set_prototypes(np.zeros((2, 1, 10)), ["a", "b"])
    with pytest.raises(ValueError, match="2 prototypes for 1 class names"):
        rt.set_prototypes(np.zeros((2, 1, 496)), ["a"])
    with pytest.raises(ValueError, match="no references set"):
        rt.predict(data.astronaut())
    with pytest.raises(ValueError, match="class 'x' has no reference image"):
        rt.set_references({"x": []})
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), str(plain), dynamo=False)
    with pytest.raises(ValueError, match="not a yolo_fewshot dynamic-references export"):
        FewShotOnnx(plain)
    with pytest.raises(FileNotFoundError, match="ONNX file not found"):
        FewShotOnnx(tmp_path / "missing.onnx")


def test_runtime_works_without_torch(exported):
    _, det, enc = exported
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from skimage import data
        from yolo_fewshot.runtime.onnx import FewShotOnnx
        rt = FewShotOnnx(r"{det}", r"{enc}")
        rt.set_references({{"cat": [data.chelsea()]}})
        print("ok", len(rt.predict(data.astronaut(), conf=0.0)) > 0)
        import yolo_fewshot
        try:
            yolo_fewshot.FewShotYOLO
        except ImportError as e:
            print("clear:", "needs torch and ultralytics" in str(e))
    """)
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ok True" in r.stdout and "clear: True" in r.stdout


def test_cli_predict_with_dynamic_detector(exported, tmp_path, capsys):
    import json

    import cv2

    from yolo_fewshot.cli import entrypoint

    _, det, _ = exported
    for name, img in (("cat", data.chelsea()), ("cup", data.coffee())):
        (tmp_path / "refs" / name).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "refs" / name / "1.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    scene = tmp_path / "scene.jpg"
    cv2.imwrite(str(scene), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    argv = [
        "predict",
        f"model={det}",
        f"refs={tmp_path / 'refs'}",
        f"source={scene}",
        "conf=0.0",
        f"project={tmp_path}",
        "name=out",
    ]
    assert entrypoint(argv) == 0  # annotated copies saved by default, as on the torch path
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["image"] == str(scene) and {d["name"] for d in line["detections"]} <= {"cat", "cup"}
    assert min(d["score"] for d in line["detections"]) < 0.25  # conf=0.0 is taken as 0, not as the default 0.25
    assert (tmp_path / "out" / "scene.jpg").is_file()
    assert entrypoint(argv) == 0  # a second run: a folder of its own (Ultralytics' increment_path: out-2)
    assert sorted(p.parent.name for p in tmp_path.glob("out*/scene.jpg")) == ["out", "out-2"]
    assert entrypoint([*argv, "name=none", "save=False"]) == 0 and not (tmp_path / "none").exists()
    assert entrypoint(["predict", f"model={det}", f"source={scene}"]) == 2
    assert "no references to look for" in capsys.readouterr().err
    assert entrypoint(["predict", f"model={det}", f"refs={tmp_path / 'refs'}", f"source={tmp_path / 'nope.jpg'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- reliability: bad ONNX files, empty or unreadable sources, swapped graphs, failing writes ----
def _refs_folder(tmp_path):
    import cv2

    (tmp_path / "refs" / "cat").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(tmp_path / "refs" / "cat" / "1.jpg"), cv2.cvtColor(data.chelsea(), cv2.COLOR_RGB2BGR))
    scene = tmp_path / "scene.jpg"
    cv2.imwrite(str(scene), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    return tmp_path / "refs", scene


def _one_line_error(capsys, argv) -> str:
    from yolo_fewshot.cli import entrypoint

    capsys.readouterr()
    assert entrypoint(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("yolo-fewshot: error: ") and "\n" not in err, err
    return err


def test_cli_bad_onnx_files_are_one_line(exported, tmp_path, capsys):
    _, det, _ = exported
    refs, scene = _refs_folder(tmp_path)
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), str(plain), dynamo=False)
    err = _one_line_error(capsys, ["predict", f"model={plain}", f"refs={refs}", f"source={scene}"])
    assert f"{plain} is not a yolo_fewshot export" in err
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(det.read_bytes()[:3000])
    err = _one_line_error(capsys, ["predict", f"model={truncated}", f"refs={refs}", f"source={scene}"])
    assert f"cannot read ONNX file {truncated}" in err and "export it again" in err


def test_cli_empty_or_unreadable_sources_are_one_line(exported, tmp_path, capsys):
    _, det, _ = exported
    refs, _ = _refs_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, ["predict", f"model={det}", f"refs={refs}", f"source={tmp_path / 'empty'}"])
    assert f"source folder {tmp_path / 'empty'} has no image" in err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    err = _one_line_error(capsys, ["predict", f"model={det}", f"refs={refs}", f"source={bad}"])
    assert f"cannot read image {bad}" in err and "reference" not in err
    rt = FewShotOnnx(det, det.with_name("encoder.onnx"))
    rt.set_references({"cat": [data.chelsea()]})
    with pytest.raises(ValueError, match=r"^cannot read image .*bad\.jpg: not an image or corrupt$"):
        rt.predict(bad)


def test_swapped_detector_and_encoder_are_refused_at_once(exported):
    _, det, enc = exported
    with pytest.raises(
        ValueError, match=r"encoder\.onnx is the encoder graph \(inputs crops, masks\), given as the det"
    ):
        FewShotOnnx(enc, det)
    with pytest.raises(
        ValueError, match=r"detector\.onnx is the detector graph \(inputs images, prototypes\), given as"
    ):
        FewShotOnnx(det, det)


def test_saving_predictions_that_cannot_be_written_is_one_line(exported, tmp_path, capsys):
    _, det, _ = exported
    refs, scene = _refs_folder(tmp_path)
    (tmp_path / "out" / "scene.jpg").mkdir(parents=True)  # the annotated copy cannot be written where it must go
    argv = [
        "predict",
        f"model={det}",
        f"refs={refs}",
        f"source={scene}",
        "save=True",
        f"project={tmp_path}",
        "name=out",
        "exist_ok=True",  # into the existing folder (else a run gets a new one, out-2)
    ]
    err = _one_line_error(capsys, argv)
    assert f"cannot write {tmp_path / 'out' / 'scene.jpg'}" in err and "disk full" in err
    assert not [f for f in (tmp_path / "out").iterdir() if f.name.startswith(".")]  # no temporary file left behind


def test_out_of_range_prototypes_are_refused_by_the_runtime(exported):
    _, det, _ = exported
    rt = FewShotOnnx(det)
    with pytest.raises(ValueError, match=r"prototypes are out of range \(\|value\| up to 1e\+30, more than float16"):
        rt.set_prototypes(np.full((1, 1, 496), 1e30, np.float32), ["huge"])
