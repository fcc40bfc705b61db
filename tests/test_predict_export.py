"""Reference-image predict/track and the baked export (references as constants) through Ultralytics' own engine."""

import json

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from skimage import data
from torchvision.ops import box_iou
from ultralytics import YOLO
from ultralytics.utils.nms import non_max_suppression

from yolo_fewshot import FewShotYOLO
from yolo_fewshot.cli import entrypoint
from yolo_fewshot.nn.detector import suppress_negatives
from yolo_fewshot.nn.verify import xywh_to_xyxy

REFS = {"cat": [data.chelsea()], "cup": [data.coffee()], "face": [(data.astronaut(), [140, 20, 330, 200])]}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("scene")
    img = cv2.resize(data.astronaut(), (160, 128))
    cv2.imwrite(str(d / "scene.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    for name, photos in (("cat", [data.chelsea()]), ("cup", [data.coffee()])):
        (d / "refs" / name).mkdir(parents=True)
        cv2.imwrite(str(d / "refs" / name / "1.jpg"), cv2.cvtColor(photos[0], cv2.COLOR_RGB2BGR))
    return d


@pytest.fixture(scope="module")
def model():
    return FewShotYOLO("yolov8n-psalm-p2.yaml", encoder="efficientnet-lite0")


def test_predict_with_refs_gives_ultralytics_results(model, scene):
    res = model.predict(str(scene / "scene.jpg"), refs=REFS, conf=0.0, imgsz=64, verbose=False)
    assert res[0].names == {0: "cat", 1: "cup", 2: "face"} and len(res[0].boxes) > 0
    assert set(res[0].boxes.cls.int().tolist()) <= {0, 1, 2}
    again = model.predict(str(scene / "scene.jpg"), conf=0.0, imgsz=64, verbose=False)  # stored references
    assert again[0].names == res[0].names


def test_predict_without_references_is_a_clear_error(scene):
    with pytest.raises(ValueError, match="no references to look for; pass refs="):
        FewShotYOLO("yolov8n-psalm.yaml", encoder="efficientnet-lite0").predict(str(scene / "scene.jpg"))


def test_cli_predict_with_refs_folder(scene, tmp_path, capsys):
    # no save=: saved by default, as by Ultralytics' `yolo predict`
    common = [f"source={scene / 'scene.jpg'}", "imgsz=64", "conf=0.0", f"project={tmp_path}", "name=p"]
    assert (
        entrypoint(
            ["predict", "model=yolov8n-psalm.yaml", "encoder=efficientnet-lite0", f"refs={scene / 'refs'}", *common]
        )
        == 0
    )
    assert "references: 2 classes ['cat', 'cup']" in capsys.readouterr().out
    assert list((tmp_path / "p").glob("scene.*"))  # Ultralytics saved the annotated image
    off = ["predict", "model=yolov8n-psalm.yaml", "encoder=efficientnet-lite0", f"refs={scene / 'refs'}", *common]
    assert entrypoint([*off[:-1], "name=off", "save=False"]) == 0
    assert not (tmp_path / "off").exists()
    assert entrypoint(["predict", "model=yolov8n-psalm.yaml", "encoder=efficientnet-lite0", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "no references to look for" in err and "\n" not in err


@pytest.mark.parametrize("n", [1, 3])
def test_baked_onnx_export_matches_torch(model, tmp_path, n, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a model built from a YAML exports next to the working directory
    model.set_references(dict(list(REFS.items())[:n]))
    model.model.eval()
    f = model.export(format="onnx", imgsz=64, simplify=False)
    proto = onnx.load(f)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert [i.name for i in proto.graph.input] == ["images"]  # a single input: the references are constants
    assert json.loads(meta["yolo_fewshot_encoder"])["name"] == "efficientnet-lite0"
    assert json.loads(meta["yolo_fewshot_references"]) == list(REFS)[:n]
    x = torch.rand(2, 3, 64, 64)
    ref_model = FewShotYOLO("yolov8n-psalm-p2.yaml", encoder="efficientnet-lite0")  # same weights, unfused
    ref_model.model.load_state_dict(model.model.state_dict())
    ref_model.model.set_prototypes(model.model.prototypes, list(model.model.names.values()))
    with torch.no_grad():
        yt = ref_model.model.eval()(x)[0]
    sess = ort.InferenceSession(f, providers=["CPUExecutionProvider"])
    yo = np.concatenate([sess.run(None, {"images": x[i : i + 1].numpy()})[0] for i in range(2)])  # batch-1 graph
    np.testing.assert_allclose(yo, yt.numpy(), atol=1e-4, rtol=1e-4)
    # an untrained model's scores crowd together: put the threshold in the widest gap between neighbouring scores, so
    # that agreement within 1e-4 must give the same detections
    top = yt[:, 4:].max(1).values.flatten().sort().values[-60:]
    gap = int((top[1:] - top[:-1]).argmax())
    thr = float(top[gap] + top[gap + 1]) / 2
    assert float(top[gap + 1] - top[gap]) > 2e-4
    # and the NMS overlap threshold in the widest gap between the IoUs of the boxes above it (a pair at IoU ~0.7 could
    # otherwise go either way on a 1e-4 difference)
    ious = []
    for i in range(len(yt)):
        keep = yt[i, 4:].max(0).values > thr
        b = xywh_to_xyxy(yt[i, :4, keep].T)
        ious.append(box_iou(b, b)[torch.triu_indices(len(b), len(b), 1).unbind()])
    cuts = torch.cat([torch.tensor([0.5, 0.9]), *ious]).clamp(0.5, 0.9).unique().sort().values
    iou_thr = float(cuts[(cuts[1:] - cuts[:-1]).argmax()] + cuts[(cuts[1:] - cuts[:-1]).argmax() + 1]) / 2
    # class-agnostic: an untrained model's classes score within 1e-4 of each other, so which class wins an anchor (and
    # so what a per-class NMS keeps) may flip between the two; the classes are compared wherever one clearly wins
    dt = non_max_suppression(yt, conf_thres=thr, iou_thres=iou_thr, agnostic=True)
    do = non_max_suppression(torch.from_numpy(yo), conf_thres=thr, iou_thres=iou_thr, agnostic=True)
    assert sum(len(d) for d in dt) > 0
    for a, b in zip(dt, do):
        assert a.shape == b.shape and torch.allclose(a[:, :5], b[:, :5], atol=1e-3)
    if n > 1:  # (the class scores themselves already agree within 1e-4 above; often no class wins by more)
        top2 = yt[:, 4:].topk(2, 1).values  # [B, 2, A]
        clear = top2[:, 0] - top2[:, 1] > 2e-4
        assert torch.equal(yt[:, 4:].argmax(1)[clear], torch.from_numpy(yo)[:, 4:].argmax(1)[clear])


def test_exported_onnx_predicts_in_ultralytics(model, scene, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model.set_references(REFS)
    f = model.export(format="onnx", imgsz=64, simplify=False)
    for m in (FewShotYOLO(f), YOLO(f, task="detect")):
        res = m.predict(str(scene / "scene.jpg"), imgsz=64, conf=0.0, verbose=False)
        assert res[0].names == {0: "cat", 1: "cup", 2: "face"}
    with pytest.raises(ValueError, match="is an exported model: its references are baked in"):  # not AttributeError
        FewShotYOLO(f).predict(str(scene / "scene.jpg"), refs={"cat": [data.chelsea()]})


def test_track_a_video_with_references(model, tmp_path):
    frame = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (160, 128))
    video = tmp_path / "v.mp4"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (160, 128))
    for i in range(6):
        w.write(np.roll(frame, i * 3, axis=1))
    w.release()
    res = model.track(
        str(video),
        refs={"face": [(data.astronaut(), [140, 20, 330, 200])]},
        imgsz=64,
        conf=0.0,
        verbose=False,
        tracker="bytetrack.yaml",
    )
    assert len(res) == 6 and all(r.names == {0: "face"} for r in res)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.predict(str(tmp_path / "missing.mp4"))
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video")
    with pytest.raises(FileNotFoundError, match="Failed to open video"):
        model.predict(str(tmp_path / "corrupt.mp4"))


def test_suppress_negatives_rule():
    y = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.5, 0.5], [0.9, 0.9], [0.6, 0.4]]])
    out = suppress_negatives(y, [0])  # classes a (0.5) and b (0.9); a negative of a scoring 0.6 then 0.4
    assert out.shape == (1, 6, 2)
    assert torch.equal(out[0, 4], torch.tensor([0.0, 0.5])) and torch.equal(out[0, 5], y[0, 5])


def test_negative_references_suppress_look_alikes(scene):
    m = FewShotYOLO("yolov8n-psalm-p2.yaml", encoder="efficientnet-lite0")
    x = torch.rand(1, 3, 64, 64)
    m.set_references({"cat": [data.chelsea()], "cup": [data.coffee()]})
    plain = m.model.eval()(x)[0]
    # a negative identical to the cat reference scores exactly as high everywhere: the cat is suppressed everywhere
    bank = m.set_references({"cat": [data.chelsea()], "cup": [data.coffee()]}, negatives={"cat": [data.chelsea()]})
    assert bank.classes["cat"].negatives is not None and m.names == {0: "cat", 1: "cup"}
    y, raw = m.model(x)
    assert y.shape == plain.shape and raw["scores"].shape[1] == 2
    neg_of, m.model._negative_of = m.model._negative_of, []  # the unfolded output: cat, cup and the cat's negative
    full = m.model(x)[0]
    m.model._negative_of = neg_of
    assert full.shape[1] == 4 + 3
    torch.testing.assert_close(y, suppress_negatives(full, [0]))
    suppressed = (y[:, 4] == 0) & (full[:, 4] > 0)
    assert suppressed.float().mean() > 0.2  # an identical look-alike ties the cat at many anchors (float noise aside)
    torch.testing.assert_close(y[:, 5], plain[:, 5], atol=1e-5, rtol=1e-4)  # the cup is untouched
    res = m.predict(str(scene / "scene.jpg"), conf=0.0, imgsz=64, verbose=False)
    assert 0 not in res[0].boxes.cls.int().tolist()
    with pytest.raises(ValueError, match="negative_of"):
        m.model.set_prototypes(
            [torch.randn(2, d) for d in m.model.proto_dims],
            ["a", "b"],
            [torch.randn(1, d) for d in m.model.proto_dims],
            [5],
        )


def test_saved_predictions_show_reference_thumbnails(scene, tmp_path):
    m = FewShotYOLO("yolov8n-psalm.yaml", encoder="efficientnet-lite0")
    bank = m.set_references({"cat": [data.chelsea()], "cup": [data.coffee()]})
    assert bank.classes["cat"].thumbnail.shape == (64, 64, 3) and bank.classes["cat"].thumbnail.dtype == torch.uint8
    bank.save(tmp_path / "b.safetensors")
    from yolo_fewshot.references.bank import ReferenceBank

    assert torch.equal(
        ReferenceBank.load(tmp_path / "b.safetensors").classes["cup"].thumbnail, bank.classes["cup"].thumbnail
    )
    kw = dict(conf=0.99, imgsz=64, save=True, project=str(tmp_path), exist_ok=True, verbose=False)  # no boxes drawn
    m.predict(str(scene / "scene.jpg"), name="with", **kw)
    m.model.reference_thumbnails = {}
    m.predictor = None  # the cached predictor holds its own copy of the model
    m.predict(str(scene / "scene.jpg"), name="without", **kw)
    a = cv2.imread(str(tmp_path / "with" / "scene.jpg")).astype(int)
    b = cv2.imread(str(tmp_path / "without" / "scene.jpg")).astype(int)
    assert a.shape == b.shape
    corner = np.abs(a[4:40, 4:40] - b[4:40, 4:40]).mean()
    rest = np.abs(a[64:, 64:] - b[64:, 64:]).mean()
    assert corner > 10 and rest < 2


def test_tensorrt_engine_export(model, tmp_path, monkeypatch):
    """The baked graph through Ultralytics' TensorRT path; needs tensorrt and a GPU, so it skips elsewhere."""
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    monkeypatch.chdir(tmp_path)
    model.set_references(REFS)
    f = model.export(format="engine", imgsz=64, half=True, device=0)
    res = YOLO(f, task="detect").predict(data.astronaut(), imgsz=64, conf=0.0, verbose=False)
    assert res[0].names == {0: "cat", 1: "cup", 2: "face"}


# -- reliability: sources without network, predictions that cannot be saved ----
def test_url_source_without_network_is_one_line(model, scene, capsys):
    url = "http://127.0.0.1:9/scene.jpg"  # nothing listens there: the download fails at once, as offline
    with pytest.raises(ConnectionError, match=r"^cannot fetch source http://127\.0\.0\.1:9/scene\.jpg \(no network"):
        model.predict(url, refs={"cat": [data.chelsea()]}, imgsz=64, verbose=False)
    with pytest.raises(ConnectionError, match=r"^cannot fetch source http://127\.0\.0\.1:9/scene\.jpg \(no network"):
        next(model.predict(url, stream=True, imgsz=64, verbose=False))  # a generator fails when iterated, same line
    argv = [
        "predict",
        "model=yolov8n-psalm.yaml",
        "encoder=efficientnet-lite0",
        f"refs={scene / 'refs'}",
        f"source={url}",
    ]
    assert entrypoint(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"yolo-fewshot: error: cannot fetch source {url}") and "\n" not in err


def test_predictions_that_cannot_be_saved_are_one_line_not_results_saved(scene, tmp_path, capsys):
    (tmp_path / "p" / "scene.jpg").mkdir(parents=True)  # where the annotated image must go, it cannot be written
    model = ["predict", "model=yolov8n-psalm.yaml", "encoder=efficientnet-lite0", f"refs={scene / 'refs'}"]
    argv = [*model, f"source={scene / 'scene.jpg'}", "imgsz=64", f"project={tmp_path}", "name=p", "exist_ok=True"]
    argv.append("save=True")
    assert entrypoint(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith(f"yolo-fewshot: error: cannot write {tmp_path / 'p' / 'scene.jpg'}") and "disk full" in err
    assert "Results saved" not in captured.out + captured.err
