"""Category search's second view: the COCO CenterNet's embedding of references and candidates, centred."""

import json

import pytest
import torch
import torch.nn.functional as F
from skimage import data

from yolo_fewshot import FewShotYOLO
from yolo_fewshot.encoders.base import masked_mean
from yolo_fewshot.nn.coco_embedding import LEVEL, coco_center, coco_embed
from yolo_fewshot.nn.verify import CropVerifier, centernet, coco_similarity
from yolo_fewshot.pretrained import load_pretrained, save_pretrained
from yolo_fewshot.references.crops import make_crop


def _crops() -> tuple[torch.Tensor, torch.Tensor]:
    """Three reference-style crops (a cat, an astronaut, a coffee cup) at the verifier's size, with their masks."""
    pairs = [make_crop(im, None, 128, 0.1) for im in (data.chelsea(), data.astronaut(), data.coffee())]
    return torch.stack([c for c, _ in pairs]), torch.stack([m for _, m in pairs])


def test_coco_embedding_is_the_masked_mean_of_the_centernet_trunks_c4_map():
    crops, masks = _crops()
    e = coco_embed(crops, masks)
    with torch.no_grad():
        want = masked_mean(centernet().trunk(crops * 255)[LEVEL], masks)
    assert e.shape == (3, want.shape[1]) and e.dtype == torch.float32
    torch.testing.assert_close(e, want)
    torch.testing.assert_close(coco_embed(crops, masks, batch=1), e, atol=1e-4, rtol=1e-4)  # batching changes nothing


def test_coco_similarity_is_the_centred_cosine_and_finds_each_crop_its_own_class():
    crops, masks = _crops()
    e = coco_embed(crops, masks)
    center = coco_center(e)
    idx = torch.zeros(3, dtype=torch.long)
    sim = coco_similarity(crops, masks, e[None], center, 1, idx)  # each crop against the three as classes
    want = F.normalize(e - center, dim=-1) @ F.normalize(e - center, dim=-1).T
    torch.testing.assert_close(sim, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(sim.argmax(1), torch.arange(3))
    raw = coco_similarity(crops, masks, e[None], None, 1, idx)  # no centre: plain cosines, all high (ReLU maps)
    torch.testing.assert_close(raw, F.normalize(e, dim=-1) @ F.normalize(e, dim=-1).T, atol=1e-5, rtol=1e-5)
    assert raw.min() > sim.min()
    with pytest.raises(ValueError, match="K >= 1"):
        coco_center(torch.zeros(0, 88))


def test_category_search_mixes_the_coco_cosine_in_and_instance_search_does_not():
    crops, masks = _crops()
    feats = [torch.rand(3, d, 4, 4) for d in (24, 40, 112, 320)]
    protos = [torch.randn(1, 3, 1, d) for d in (40, 112, 320)]
    e = coco_embed(crops, masks)
    coco = (e[None], coco_center(e))
    idx = torch.zeros(3, dtype=torch.long)
    trunk = lambda x: feats  # noqa: E731  (the trunk's maps of the crops, as the verifier takes them)

    def compare(v: CropVerifier, with_coco=True):
        v.crops = lambda img, i, b, size: (crops, masks)  # the crops themselves, not cut from a scene
        return v.compare(trunk, torch.zeros(1, 3, 64, 64), idx, torch.zeros(3, 4), protos, 3, coco=coco if with_coco
                         else None)  # fmt: skip

    cat = compare(CropVerifier(top1=False, layout=0.0, votes=0.0), with_coco=False)
    sim = coco_similarity(crops, masks, *coco, 1, idx)
    torch.testing.assert_close(compare(CropVerifier(top1=False, layout=0.0, votes=0.0)), 0.75 * cat + 0.25 * sim)
    torch.testing.assert_close(compare(CropVerifier(top1=False, coco=0.5)), 0.5 * cat + 0.5 * sim)
    inst = CropVerifier(top1=True, layout=0.0, votes=0.0, levels=1)  # instance search: its own crop cosine only
    torch.testing.assert_close(compare(inst), compare(inst, with_coco=False))


def test_references_carry_their_coco_embeddings_into_the_model_and_a_saved_bank(tmp_path):
    m = FewShotYOLO("yolov8n-lite0-proto.yaml")
    bank = m.set_references({"cat": [data.chelsea()], "cup": [data.coffee(), data.coffee()[:, ::-1]]})
    coco = m.model.coco_prototypes
    assert coco.shape == (1, 2, bank.classes["cat"].coco.shape[1])
    torch.testing.assert_close(coco[0, 1], bank.classes["cup"].coco.mean(0))
    loaded = type(bank).load(bank.save(tmp_path / "bank.safetensors"))
    torch.testing.assert_close(loaded.coco_prototypes(), bank.coco_prototypes())
    # prototypes set by hand: no COCO embeddings stand for them
    m.set_prototypes([torch.randn(2, d) for d in m.model.proto_dims], ["a", "b"])
    assert m.model.coco_prototypes is None and m.model.coco is None


def test_the_coco_centre_travels_with_a_pretrained_file_and_bad_metadata_is_one_line(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = load_pretrained(save_pretrained(FewShotYOLO("yolov8n-lite0-proto.yaml").model, tmp_path / "a.safetensors"))
    assert getattr(model, "coco_center", None) is None  # a model without one: category search is uncentred
    model.coco_center = torch.linspace(-1, 1, 88)
    path = save_pretrained(model, tmp_path / "b.safetensors")
    torch.testing.assert_close(load_pretrained(path).coco_center, model.coco_center, atol=1e-6, rtol=0)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(tmp_path / "c.safetensors"), metadata={**meta, "coco_center": json.dumps("x")})
    with pytest.raises(ValueError, match="coco_center metadata is not a list of numbers"):
        load_pretrained(tmp_path / "c.safetensors")
    save_file(load_file(str(path)), str(tmp_path / "d.safetensors"), metadata={**meta, "coco_center": "[1, NaN]"})
    with pytest.raises(ValueError, match="coco_center metadata must be a finite"):
        load_pretrained(tmp_path / "d.safetensors")


def test_head_objectness_applies_as_far_as_the_head_recognises_the_objects():
    # three images, the same two CenterNet boxes; the head sees objects there in the first image, barely in the
    # second, not at all in the third
    v = CropVerifier(proposals="head+centernet", head_objectness=1.0, topk=1)
    cn_boxes = torch.tensor([[[10.0, 10, 50, 50], [60, 60, 100, 100]]]).repeat(3, 1, 1)
    cn_obj = torch.tensor([[0.6, 0.3]]).repeat(3, 1)
    v.centernet_boxes = lambda img: (cn_boxes, cn_obj)  # the candidates CenterNet would give, without running it
    y = torch.zeros(3, 5, 2)
    y[:, :4] = torch.tensor([[30.0, 80], [30, 80], [40, 40], [40, 40]])  # head anchors on the two boxes (xywh)
    y[:, 4] = 0.5
    seen = torch.tensor([[0.8, 0.4], [0.02, 0.01], [0.0, 0.0]])  # the head's objectness there
    obj = torch.logit(seen)[:, None]
    *_, cobj = v.candidates(torch.zeros(3, 3, 128, 128), y, obj)
    got = cobj[-6:].view(3, 2)  # CenterNet's candidates come after the head's
    n_head = len(cobj) - 6
    agree = (seen * cn_obj).sum(1) / cn_obj.sum(1)
    assert agree[0] >= v.head_trust > agree[1] > 0
    torch.testing.assert_close(got[0], cn_obj[0] * seen[0])  # trusted: both networks must see an object
    trust = agree[1] / v.head_trust  # a little agreement: the head's objectness, to a small power
    torch.testing.assert_close(got[1], cn_obj[1] * seen[1] ** trust)
    assert (got[1] < cn_obj[1]).all() and (got[1] > cn_obj[1] * seen[1]).all()
    torch.testing.assert_close(got[2], cn_obj[2])  # the head sees nothing here: COCO's objectness alone
    everywhere = CropVerifier(proposals="head+centernet", head_objectness=1.0, topk=1, head_trust=0.0)
    everywhere.centernet_boxes = v.centernet_boxes
    *_, cobj = everywhere.candidates(torch.zeros(3, 3, 128, 128), y, obj)
    # the full power in every image: where the head sees nothing, CenterNet's boxes are no candidates at all
    assert len(cobj) == n_head + 4
    torch.testing.assert_close(cobj[-4:].view(2, 2), (cn_obj * seen)[:2])
