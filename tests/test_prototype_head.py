"""The one-feature-space model: frozen trunk = encoder, class-agnostic head, cosine prior, crop verification."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from ultralytics.utils.tal import make_anchors

from yolo_fewshot import FewShotYOLO
from yolo_fewshot.encoders.base import masked_mean
from yolo_fewshot.nn.detector import FewShotDetectionModel
from yolo_fewshot.nn.loss import PrototypeDetectionLoss
from yolo_fewshot.nn.prototype_detect import PrototypeDetect
from yolo_fewshot.nn.verify import CropVerifier
from yolo_fewshot.references.crops import make_crop

YAML = "yolov8n-lite0-proto.yaml"


@pytest.fixture(scope="module")
def model() -> FewShotDetectionModel:
    torch.manual_seed(0)
    return FewShotDetectionModel(YAML, verbose=False).eval()


def _protos(model, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g) for d in model.proto_dims]


def _pasted_scene() -> tuple[np.ndarray, tuple[int, int, int, int], np.ndarray]:
    """The cat of scikit-image's ``chelsea`` pasted on gravel: (scene, its box xyxy, the reference photo)."""
    cat = data.chelsea()
    scene = cv2.resize(np.repeat(data.gravel()[..., None], 3, -1), (320, 320))
    x0, y0, w, h = 40, 180, 96, 80
    scene[y0 : y0 + h, x0 : x0 + w] = cv2.resize(cat[30:280, 100:400], (w, h))
    return scene, (x0, y0, x0 + w, y0 + h), cat


def test_trunk_is_frozen_and_is_the_encoder(model):
    trunk = model.model[0]
    assert trunk.frozen and not any(p.requires_grad for p in trunk.parameters())
    model.train()
    assert not trunk.training  # ImageNet BatchNorm statistics are kept in training mode
    model.eval()
    assert model.class_agnostic and model.can_verify and isinstance(model.model[-1], PrototypeDetect)


def test_prototypes_are_masked_means_of_the_backbones_maps():
    m = FewShotYOLO(YAML)
    cat = data.chelsea()
    box = [100, 30, 400, 280]
    bank = m.set_references({"cat": [(cat, box)]})
    crop, mask = make_crop(cat, box, size=m.encoder.spec.input_size)
    with torch.no_grad():
        maps = m.model.model[0](crop[None])  # the detector's own trunk: P2..P5
    expected = [masked_mean(f, mask[None]) for f in maps[-len(m.model.proto_dims) :]]
    for got, want in zip(m.model.prototypes, expected):
        torch.testing.assert_close(got[0, 0, 0], want[0], atol=1e-4, rtol=1e-4)
    assert bank is not None


def test_similarity_prior_at_step_zero_is_the_direct_cosine(model):
    protos = _protos(model, 3)
    model.set_prototypes(protos)
    x = torch.rand(1, 3, 256, 192)
    with torch.no_grad():
        _, raw = model(x)
        trunk = model.model[0](x)[1:]  # P3..P5
    head = model.model[-1]
    model._bind(model.prototypes)
    with torch.no_grad():
        learned = head.similarity(raw["feats"], [torch.zeros_like(t) for t in trunk])  # prior term zeroed
    model._bind(None)
    direct = []
    for lv, (f, p) in enumerate(zip(trunk, protos)):
        cos = F.cosine_similarity(f[0].flatten(1)[None], p[:, :, None], dim=1)  # [N, HW], one location at a time
        direct.append(head.prior_scale[lv] * cos)
    torch.testing.assert_close(raw["sim"][0] - learned[0], torch.cat(direct, 1), atol=1e-4, rtol=1e-4)
    # the learned term starts small against the prior: the untrained scores follow the prior's ranking
    prior = torch.cat(direct, 1).flatten()
    assert torch.corrcoef(torch.stack([raw["sim"][0].flatten(), prior]))[0, 1] > 0.8
    model.set_prototypes(None)


def test_one_class_scores_the_same_alone_or_among_many(model):
    model.set_verify(False)
    x = torch.rand(2, 3, 224, 224)
    protos = _protos(model, 6)
    model.set_prototypes(protos)
    with torch.no_grad():
        many = model(x)[0]
    model.set_prototypes([p[4:5] for p in protos])
    with torch.no_grad():
        alone = model(x)[0]
    torch.testing.assert_close(alone[:, 4], many[:, 8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[:, :4], many[:, :4])  # class-agnostic boxes
    model.set_prototypes(None)
    model.set_verify(True)


def test_zero_init_dense_scores_peak_on_the_pasted_object():
    m = FewShotYOLO(YAML)
    scene, (x1, y1, x2, y2), cat = _pasted_scene()
    m.set_references({"cat": [cat]})
    net = m.model.eval()
    x = torch.from_numpy(scene).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        _, raw = net(x)
    anchors, strides = make_anchors(raw["feats"], net.stride, 0.5)
    cx, cy = (anchors * strides)[raw["sim"][0, 0].argmax()].tolist()
    assert x1 <= cx <= x2 and y1 <= cy <= y2


@pytest.mark.parametrize("levels", [1, 3])
def test_crop_verifier_scores_the_pasted_object_first(levels):
    m = FewShotYOLO(YAML)
    scene, box, cat = _pasted_scene()
    m.set_references({"cat": [cat]})
    net = m.model.eval()
    x = torch.from_numpy(scene).permute(2, 0, 1)[None].float() / 255
    # candidates: a grid of background boxes clear of the cat, and the cat's box; objectness equal everywhere
    grid = [[cx, cy, 96, 80] for cx in range(48, 320, 64) for cy in range(40, 320, 60)]
    boxes = [b for b in grid if abs(b[0] - 88) >= 96 or abs(b[1] - 220) >= 80] + [[88, 220, 96, 80]]
    y = torch.cat([torch.tensor(boxes, dtype=torch.float).T[None], torch.full((1, 1, len(boxes)), 0.5)], 1)
    v = CropVerifier(topk=len(boxes), iou=1.0, levels=levels, proposals="head")
    out = v(net.model[0], x, y, torch.zeros(1, 1, len(boxes)), net.prototypes)
    assert int(out[0, 4].argmax()) == len(boxes) - 1
    assert out.shape == y.shape and torch.equal(out[:, :4], y[:, :4])


def test_an_instance_is_in_a_scene_once():
    m = FewShotYOLO(YAML)
    scene, box, cat = _pasted_scene()
    m.set_references({"cat": [cat]})
    net = m.model.eval()
    x = torch.from_numpy(scene).permute(2, 0, 1)[None].float() / 255
    x = torch.cat([x, x.flip(-1)])  # two images
    boxes = [[88, 220, 96, 80], [200, 80, 96, 80], [260, 250, 60, 60]]
    y = torch.cat([torch.tensor(boxes, dtype=torch.float).T[None], torch.full((1, 1, 3), 0.5)], 1).repeat(2, 1, 1)
    args = (net.model[0], x, y, torch.zeros(2, 1, 3), net.prototypes)
    off = CropVerifier(topk=3, iou=1.0, proposals="head", once=1.0)(*args)[:, 4]  # [B, A]
    on = CropVerifier(topk=3, iou=1.0, proposals="head")(*args)[:, 4]  # instance search: 0.2 by default
    best = off.argmax(1)
    for i in range(2):  # each image keeps its best candidate; the others are scaled down
        keep = torch.arange(3) == best[i]
        torch.testing.assert_close(on[i, keep], off[i, keep])
        torch.testing.assert_close(on[i, ~keep], off[i, ~keep] * 0.2)
    cat_search = CropVerifier(topk=3, iou=1.0, proposals="head", top1=False)  # several apples may be in a scene
    torch.testing.assert_close(cat_search(*args)[:, 4], CropVerifier(topk=3, iou=1.0, proposals="head", top1=False,
                                                                     once=1.0)(*args)[:, 4])  # fmt: skip


@pytest.mark.parametrize("proposals", ["head", "both"])
def test_a_half_precision_model_verifies_like_the_float_one(proposals):
    # Ultralytics validates and predicts in half precision on a GPU (the trainer's final validation does): the
    # verifier's cosines, the head's NMS and CenterNet's candidates must run on half maps and prototypes alike
    m = FewShotYOLO()  # the shipped weights: a trained head, so its top candidates are not near-ties
    scene, box, cat = _pasted_scene()
    m.set_references({"cat": [cat]})
    net = m.model.eval()
    net.set_verify(CropVerifier(proposals=proposals))
    x = torch.from_numpy(scene).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        full = net(x)[0]
        half = net.half()(x.half())[0]
    assert half.dtype == torch.float16 and half.shape == full.shape
    best = int(full[0, 4].argmax())
    assert int(half[0, 4].argmax()) == best and full[0, 4, best] > 0.25  # the cat, found in both precisions
    cx, cy = full[0, :2, best].tolist()
    assert box[0] <= cx <= box[2] and box[1] <= cy <= box[3]
    torch.testing.assert_close(half[0, 4].float(), full[0, 4], atol=0.01, rtol=0.0)


def test_verified_predictions_are_merged_at_nms_iou_half_unless_told():
    from yolo_fewshot.model import VERIFIED_NMS_IOU

    m = FewShotYOLO()
    scene, _, cat = _pasted_scene()
    m.predict(scene, refs={"cat": [cat]}, imgsz=320, verbose=False)
    assert m.predictor.args.iou == VERIFIED_NMS_IOU == 0.5
    m.predict(scene, iou=0.7, imgsz=320, verbose=False)  # an explicit setting wins
    assert m.predictor.args.iou == 0.7
    one_pass = FewShotYOLO()
    one_pass.predict(scene, refs={"cat": [cat]}, verify=False, imgsz=320, verbose=False)
    assert one_pass.predictor.args.iou == 0.7  # one pass, one source of boxes: Ultralytics' default


def test_verifier_similarity_is_the_mean_of_the_levels_cosines():
    torch.manual_seed(0)
    feats = [torch.rand(2, d, 8, 8) for d in (4, 5, 6, 7)]  # P2..P5 of two crops
    protos = [torch.randn(1, 3, 2, d) for d in (5, 6, 7)]  # P3..P5, 3 classes, 2 references each
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 8:24, 4:28] = 1
    idx = torch.zeros(2, dtype=torch.long)

    def cos(level):
        e = F.normalize(masked_mean(feats[level], masks), dim=-1)
        return e @ F.normalize(protos[level - 1][0].mean(1), dim=-1).T

    one = CropVerifier(levels=1).similarity(feats, masks, protos, 1, idx)
    three = CropVerifier(levels=3).similarity(feats, masks, protos, 1, idx)
    assert torch.allclose(one, cos(3), atol=1e-6)
    assert torch.allclose(three, (cos(1) + cos(2) + cos(3)) / 3, atol=1e-6)
    # more levels than the prototypes have: all of them
    assert torch.allclose(CropVerifier(levels=9).similarity(feats, masks, protos, 1, idx), three, atol=1e-6)
    # by default: P3-P5 for instance search (top1), P5 alone for category search
    assert torch.allclose(CropVerifier().similarity(feats, masks, protos, 1, idx), three, atol=1e-6)
    assert torch.allclose(CropVerifier(top1=False).similarity(feats, masks, protos, 1, idx), one, atol=1e-6)


def test_verifier_crops_keep_the_box_layout_of_reference_crops():
    img = torch.zeros(1, 3, 100, 200)
    crops, masks = CropVerifier(context=0.1).crops(img, torch.tensor([0]), torch.tensor([[20.0, 10, 120, 60]]), 64)
    assert crops.shape == (1, 3, 64, 64) and masks.shape == (1, 1, 64, 64)
    # a 100x50 box in a square window of side 120: mask 64*100/120 wide, 64*50/120 high, centred
    cols, rows = masks[0, 0].amax(0).sum().item(), masks[0, 0].amax(1).sum().item()
    assert abs(cols - 64 * 100 / 120) <= 1.5 and abs(rows - 64 * 50 / 120) <= 1.5


def test_loss_teaches_objectness_from_every_box_and_similarity_from_the_episode(model):
    from ultralytics.cfg import get_cfg

    model.args = get_cfg()
    model.criterion = None
    model.train()
    x = torch.rand(2, 3, 160, 160)
    # per level [B=2, N=2, M=1, D]; image 0's second slot is empty (all zero)
    protos = [torch.stack([p, p])[:, :, None].clone() for p in _protos(model, 2)]
    for p in protos:
        p[0, 1] = 0
    batch = {
        "img": x,
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
        "cls": torch.tensor([[0.0], [-1.0], [1.0]]),  # slot 0, an object of a class not asked about, slot 1
        "bboxes": torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]]),
        "protos": protos,
    }
    loss, items = model.loss(batch)
    assert isinstance(model.criterion, PrototypeDetectionLoss)
    assert set(items) == {"box_loss", "cls_loss", "dfl_loss", "sim_loss"}
    assert all(torch.isfinite(v) for v in items.values()) and items["sim_loss"] > 0
    loss.sum().backward()
    head = model.model[-1]
    assert head.embed_scale.grad is not None and head.embed_scale.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model[0].parameters())
    model.zero_grad()
    model.eval()


def test_classes_compete_for_a_candidate_softly_or_not_at_all():
    from yolo_fewshot.nn.verify import exclusive

    cos = torch.tensor([[0.60, 0.50, 0.20], [0.40, 0.41, 0.10], [0.30, 0.30, 0.30]])
    soft = exclusive(cos, 0.02)
    assert soft[0, 0] > 0.99 and soft[0, 1] < 0.01  # a clear winner owns the box
    assert 0.3 < soft[1, 0] < 0.5 < soft[1, 1] < 0.7  # a near tie is shared, the better class keeps more
    assert torch.allclose(soft[2], torch.full((3,), 0.5))  # an exact tie: no class owns it
    hard = exclusive(cos, 0.0)
    assert hard[:2].tolist() == [[1, 0, 0], [0, 1, 0]]
    assert torch.equal(exclusive(cos[:, :1], 0.02), torch.ones(3, 1))  # one class has nothing to compete with


def test_top1_is_a_run_setting_of_verification():
    m = FewShotYOLO(YAML)
    scene, box, cat = _pasted_scene()
    m.predict(scene, refs={"cat": [cat], "gravel": [scene[:100, 200:]]}, top1=False, conf=0.5, verbose=False)
    assert m.model.verifier is not None and m.model.verifier.top1 is False
    m.predict(scene, top1=True, conf=0.5, verbose=False)
    assert m.model.verifier.top1 is True
    with pytest.raises(ValueError, match="top1=True needs crop verification on"):
        m.model.set_verify(False, top1=True)
    with pytest.raises(ValueError, match="top1='maybe' must be True or False"):
        m.predict(scene, top1="maybe", conf=0.5, verbose=False)
    from yolo_fewshot.engine.cfg import check_settings

    with pytest.raises(ValueError, match="top1='yes' must be True or False"):
        check_settings({"top1": "yes"})


def test_verification_in_chunks_gives_the_same_scores():
    # Ultralytics predicts a list of paths as one batch: the verifier runs CenterNet and the trunk over it in chunks
    import dataclasses

    m = FewShotYOLO()
    scene, _, cat = _pasted_scene()
    m.set_references({"cat": [cat]})
    net = m.model.eval()
    x = torch.from_numpy(np.stack([scene, scene[::-1].copy(), scene[:, ::-1].copy()])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        whole = net(x)[0]
        net.verifier = dataclasses.replace(net.verifier, chunk=1)  # one image per CenterNet pass, 16 crops per trunk
        chunked = net(x)[0]
    assert whole.shape == chunked.shape and whole[:, 4].amax() > 0.1
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["hubness", "colour"])
def test_verifier_weights_are_run_settings(key, tmp_path, capsys):
    from yolo_fewshot.cli import entrypoint

    m = FewShotYOLO(YAML)
    scene, box, cat = _pasted_scene()
    m.predict(scene, refs={"cat": [cat], "gravel": [scene[:100, 200:]]}, **{key: 0}, conf=0.5, verbose=False)
    assert getattr(m.model.verifier, key) == 0.0 and m.model.verifier.top1 is True  # off, the rest as it was
    m.predict(scene, **{key: 0.75}, conf=0.5, verbose=False)
    assert getattr(m.model.verifier, key) == 0.75
    m.track(scene, **{key: 0.25}, conf=0.5, verbose=False)
    assert getattr(m.model.verifier, key) == 0.25
    with pytest.raises(ValueError, match=f"{key}=0.5 needs crop verification on"):
        m.model.set_verify(False, **{key: 0.5})
    with pytest.raises(ValueError, match=rf"{key}=-1 must be a number in \[0, 2\]"):
        m.predict(scene, **{key: -1}, conf=0.5, verbose=False)
    # on the command line: a known key, checked before any work, one line
    import cv2

    (tmp_path / "refs" / "cat").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "refs" / "cat" / "a.png"), cat)
    argv = ["predict", f"model={YAML}", f"{key}=yes", f"refs={tmp_path / 'refs'}", f"source={tmp_path / 'refs'}"]
    assert entrypoint(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"{key}='yes' must be a number in [0, 2]" in err and "\n" not in err


def test_confidences_stay_at_most_one_when_bonuses_take_the_similarity_past_one():
    from yolo_fewshot.nn.verify import CropVerifier, soft_unit

    x = torch.linspace(-1, 3, 401)
    y = soft_unit(x)
    assert torch.equal(y[x <= 0.9], x[x <= 0.9])  # the calibrated range is untouched
    assert y.max() <= 1 and torch.all(y[1:] >= y[:-1])  # never past 1, order kept
    near = x <= 1.5
    assert torch.all(y[near][1:] > y[near][:-1])  # strictly (float32 rounds tanh to 1 only far past the knee)
    cos = torch.tensor([[1.4, 0.2], [0.95, 0.1], [0.6, 0.3]])  # votes and colour can lift a cosine past 1
    score = CropVerifier(top1=True).score(cos, torch.ones(3), torch.arange(3), 3)
    assert score.max() <= 1 and score[0, 0] > score[1, 0] > score[2, 0]
