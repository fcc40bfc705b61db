"""Verification's candidates: the head's boxes, the COCO CenterNet's class-agnostic boxes, or both (issue 16)."""

import pickle

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from skimage import data
from torchvision.ops import box_iou

from yolo_fewshot import FewShotYOLO
from yolo_fewshot.engine.cfg import PLUGIN_DEFAULTS, check_settings
from yolo_fewshot.nn import verify
from yolo_fewshot.nn.verify import CropVerifier, xywh_to_xyxy

YAML = "yolov8n-lite0-proto.yaml"


def _pasted_scene() -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """The cat of scikit-image's ``chelsea`` pasted on gravel: (scene RGB, its box xyxy [1, 4], the reference)."""
    cat = data.chelsea()
    scene = cv2.resize(np.repeat(data.gravel()[..., None], 3, -1), (320, 320))
    x0, y0, w, h = 40, 180, 96, 80
    scene[y0 : y0 + h, x0 : x0 + w] = cv2.resize(cat[30:280, 100:400], (w, h))
    return scene, torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float), cat


@pytest.fixture(scope="module")
def fs() -> FewShotYOLO:
    torch.manual_seed(0)
    m = FewShotYOLO(YAML)
    m.set_references({"cat": [_pasted_scene()[2]]})
    m.model.eval()
    return m


def _run(net, x: torch.Tensor, proposals: str, **settings) -> torch.Tensor:
    net.set_verify(CropVerifier(**settings) if settings else True, proposals)
    with torch.no_grad():
        return net(x)[0]


def test_union_keeps_both_sources_boxes(fs):
    scene, _, _ = _pasted_scene()
    x = torch.from_numpy(scene).permute(2, 0, 1)[None].float() / 255
    x = torch.cat([x, x.flip(-1)])
    net = fs.model
    # (the same head candidates in both runs, none dropped as a part of a CenterNet box, and no once-per-scene rule,
    # which ranks a class's candidates together)
    head, cn, both = (_run(net, x, p, topk=3, once=1.0, part=2.0) for p in ("head", "centernet", "both"))
    a, k = head.shape[-1], CropVerifier().centernet_topk
    assert cn.shape == both.shape == (2, 5, a + k)
    assert (head[:, 4] > 0).sum() > 0 and (cn[:, 4, a:] > 0).sum() > 0
    assert (cn[:, 4, :a] == 0).all()  # centernet alone: no head candidate
    # the union: the head's candidates with their scores, then CenterNet's with theirs, each verified alike
    torch.testing.assert_close(both[..., :a], head, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[..., a:], cn[..., a:], atol=1e-5, rtol=1e-4)
    # by default the head gives 10 candidates alone, its 3 best beside CenterNet's boxes
    assert ((_run(net, x, "head")[:, 4] > 0).sum(1) > 3).all()
    assert ((_run(net, x, "both")[:, 4, :a] > 0).sum(1) <= 3).all()
    # by default a head box that is a part of one of CenterNet's confident boxes is no candidate; the others keep
    # their scores
    cn_boxes, cn_obj = CropVerifier().centernet_boxes(x)
    head_boxes = xywh_to_xyxy(head[:, :4].transpose(1, 2))
    kept = _run(net, x, "both", topk=3, once=1.0)
    for i in range(2):
        cand = (head[i, 4] > 0).nonzero()[:, 0]
        whole = (cn_obj[i] >= CropVerifier().part).expand(len(cand), -1)  # CenterNet's confident boxes
        part = verify.parts(head_boxes[i, cand], cn_boxes[i].expand(len(cand), -1, -1), whole)
        assert (kept[i, 4, cand[part]] == 0).all()
        torch.testing.assert_close(kept[i, 4, cand[~part]], head[i, 4, cand[~part]], atol=1e-5, rtol=1e-4)
    net.set_verify(True)


def test_head_objectness_scales_centernet_candidates(fs):
    """With ``head_objectness``, CenterNet's candidates are scored as before times the head's objectness where they
    are (to a power): never more, and nothing where no head box overlaps one; the head's own candidates unchanged."""
    scene, _, _ = _pasted_scene()
    x = torch.from_numpy(scene).permute(2, 0, 1)[None].float() / 255
    net = fs.model
    plain = _run(net, x, "both", once=1.0)
    scaled = _run(net, x, "both", once=1.0, head_objectness=1.0, head_trust=0.0)  # in every image
    a = plain.shape[-1] - CropVerifier().centernet_topk
    torch.testing.assert_close(scaled[..., :a], plain[..., :a])
    cn_plain, cn_scaled = plain[0, 4, a:], scaled[0, 4, a:]
    assert (cn_plain > 0).any() and (cn_scaled <= cn_plain + 1e-6).all() and (cn_scaled < cn_plain - 1e-6).any()
    cn_boxes = xywh_to_xyxy(plain[0, :4, a:].T)
    head_boxes = xywh_to_xyxy(plain[0, :4, :a].T)
    alone = (box_iou(cn_boxes, head_boxes) < 0.5).all(1)  # no head anchor where the CenterNet box is
    assert (cn_scaled[alone] == 0).all()
    net.set_verify(True)


def test_parts_are_boxes_mostly_inside_a_larger_box():
    wholes = torch.tensor([[[0.0, 0, 100, 100], [200, 200, 210, 210]]])
    boxes = torch.tensor(
        [
            [10.0, 10, 40, 40],  # inside the first whole: a part
            [80, 80, 120, 120],  # a quarter of it inside: not a part
            [0, 0, 90, 90],  # inside, but 81 % of the whole's area: not twice as small
            [201, 201, 209, 209],  # inside the second whole, which is padding
        ]
    )
    valid = torch.tensor([[True, False]])
    part = verify.parts(boxes, wholes.expand(4, -1, -1), valid.expand(4, -1), 0.7)
    assert part.tolist() == [True, False, False, False]
    assert verify.parts(boxes[1:2], wholes, valid, 0.25).tolist() == [True]  # the share asked for


def test_output_shape_contract(fs):
    net = fs.model
    x = torch.rand(1, 3, 256, 320)
    net.set_verify(False)
    with torch.no_grad():
        plain = net(x)[0]
    a = plain.shape[-1]
    for p in ("head", "centernet", "both"):
        out = _run(net, x, p)
        extra = net.verifier.extra_columns(1)
        assert extra == (0 if p == "head" else net.verifier.centernet_topk)
        assert out.shape == (1, 5, a + extra)
        torch.testing.assert_close(out[..., :4, :a], plain[..., :4, :])  # the head's boxes unchanged
        ex = xywh_to_xyxy(out[0, :4, a:].T)
        assert (ex[:, :2] >= -1e-3).all() and (ex[:, 2] <= 320 + 1e-3).all() and (ex[:, 3] <= 256 + 1e-3).all()
    # more columns than CenterNet has cells (16 x 16 at a 64 px input): the rest is padding, empty boxes scoring 0
    net.set_verify(CropVerifier(proposals="centernet", centernet_size=64, centernet_topk=300, size=64))
    with torch.no_grad():
        out = net(x)[0]
    assert out.shape == (1, 5, a + 300)
    pad = out[0, 2:4, a:].prod(0) == 0
    assert pad.sum() >= 300 - 16 * 16 and (out[0, 4, a:][pad] == 0).all()
    net.set_verify(True)


def test_pasted_coco_object_found_by_centernet_proposals(fs):
    scene, cat_box, _ = _pasted_scene()
    x = torch.from_numpy(scene).permute(2, 0, 1)[None].float() / 255
    boxes, obj = CropVerifier(proposals="centernet").centernet_boxes(x)
    assert box_iou(boxes[0][obj[0] > 0], cat_box).max() >= 0.7  # CenterNet has the cat among its boxes
    for p in ("centernet", "both"):  # and, verified, it is the top detection, through Ultralytics' predictor
        r = fs.predict(np.ascontiguousarray(scene[..., ::-1]), proposals=p, conf=0.001, imgsz=320, verbose=False)[0]
        top = r.boxes.xyxy[r.boxes.conf.argmax()][None]
        assert box_iou(top, cat_box).item() >= 0.5, p
    fs.model.set_verify(True)


def test_centernet_is_kept_out_of_state_dict_and_pickles(fs):
    net = fs.model
    keys = set(net.state_dict())
    _run(net, torch.rand(1, 3, 128, 128), "both")
    assert verify._CENTERNET  # loaded once, in the module cache
    assert set(net.state_dict()) == keys and not any("centernet" in k.lower() for k in keys)
    blob = pickle.dumps(net)
    assert b"CenterNet" not in blob and b"heatmap" not in blob
    assert pickle.loads(blob).verifier.proposals == "both"  # the setting travels, the network does not
    net.set_verify(True)


def test_onnx_export_has_no_centernet_and_no_verification(fs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs.model.set_verify(True, "both")
    f = fs.export(format="onnx", imgsz=64, simplify=False)
    assert fs.model.verifier.proposals == "both"  # the export does not change the model's setting
    x = torch.rand(1, 3, 64, 64)
    fs.model.set_verify(False)
    with torch.no_grad():
        plain = fs.model(x)[0]
    yo = ort.InferenceSession(f, providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    assert yo.shape == tuple(plain.shape)  # no extra CenterNet columns
    np.testing.assert_allclose(yo, plain.numpy(), atol=1e-4, rtol=1e-4)  # the one-pass scores: no verification
    n_onnx = sum(int(np.prod(t.dims)) for t in onnx.load(f).graph.initializer)
    n_model = sum(p.numel() for p in fs.model.parameters()) + sum(b.numel() for b in fs.model.buffers())
    assert n_onnx <= n_model  # CenterNet's ~2M weights are not in the graph
    fs.model.set_verify(True)


def test_proposals_setting_is_checked_and_applied(fs):
    assert PLUGIN_DEFAULTS["proposals"] == CropVerifier().proposals
    with pytest.raises(ValueError, match=r"^proposals='bogus' must be one of head, centernet, keypoints or several"):
        fs.model.set_proposals("bogus")
    with pytest.raises(ValueError, match="must be one of"):
        check_settings({"proposals": "coco"})
    with pytest.raises(ValueError, match=r"needs crop verification on \(verify=True\)"):
        fs.model.set_verify(False, "both")
    fs.model.set_verify(True)
    fs.predict(np.zeros((64, 64, 3), np.uint8), proposals="centernet", imgsz=64, verbose=False)
    assert fs.model.verifier.proposals == "centernet"
    fs.predict(np.zeros((64, 64, 3), np.uint8), verify=True, imgsz=64, verbose=False)  # verify=True: defaults
    assert fs.model.verifier.proposals == CropVerifier().proposals


def test_centernet_runs_beside_the_forward_and_gives_the_same_answer(fs, monkeypatch):
    scene, _, _ = _pasted_scene()
    x = torch.from_numpy(scene).permute(2, 0, 1)[None].float() / 255
    assert CropVerifier(proposals="head").prefetch(x) is None  # nothing to start without CenterNet's candidates
    v = CropVerifier()
    pending = v.prefetch(x)
    for a, b in zip(pending.result(), v.centernet_boxes(x)):
        torch.testing.assert_close(a, b)  # on the worker thread: the same boxes
    # through the model: the prefetched boxes are the ones verified (CenterNet is not run a second time)
    calls = []
    real = CropVerifier.centernet_boxes
    monkeypatch.setattr(CropVerifier, "centernet_boxes", lambda self, img: calls.append(1) or real(self, img))
    inline = _run(fs.model, x, "both")
    monkeypatch.setattr(CropVerifier, "prefetch", lambda self, img: None)  # the same, computed after the forward
    after = _run(fs.model, x, "both")
    torch.testing.assert_close(inline, after)
    assert len(calls) == 2  # once per run
    fs.model.set_verify(True)
