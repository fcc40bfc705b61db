"""Keypoint votes (issue 11, instance search): SIFT descriptors of candidate crops matched against one database of all
classes' reference descriptors, a vote counting only when its class is clearly nearer than every other class."""

import numpy as np
import pytest
import torch
from skimage import data

from tests.conftest import bank_without
from yolo_fewshot import FewShotYOLO
from yolo_fewshot.nn.keypoint_votes import crop_descriptors, keypoint_votes, reference_descriptors
from yolo_fewshot.nn.verify import CropVerifier
from yolo_fewshot.references.bank import ReferenceBank
from yolo_fewshot.references.crops import make_crop

YAML = "yolov8n-lite0-proto.yaml"


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.rand(*shape, generator=g), dim=-1) * 100


def test_votes_count_keypoints_clearly_nearest_to_one_class():
    a, b = _unit(20, 128, seed=1), _unit(20, 128, seed=2)
    q_a = a[:5] + 0.5  # near class 0's descriptors
    q_ab = (a[:4] + b[:4]) / 2  # halfway between the classes: no evidence for either
    votes = keypoint_votes([q_a, q_ab, torch.zeros(0, 128)], [a, b])
    assert votes.tolist() == [[5.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    # a class without descriptors takes no vote and does not block the others
    assert keypoint_votes([q_a], [a, torch.zeros(0, 128), b]).tolist() == [[5.0, 0.0, 0.0]]
    # one class (or one with descriptors): no other class to be clearly nearer than, no vote
    assert keypoint_votes([q_a], [a]).tolist() == [[0.0]]
    assert keypoint_votes([q_a], [a, torch.zeros(0, 128)]).tolist() == [[0.0, 0.0]]


def test_reference_descriptors_hold_the_crop_and_its_mirror_image():
    crop, mask = make_crop(data.astronaut(), [150, 20, 350, 250], 224, 0.1)
    direct = crop_descriptors(crop[None], mask[None])[0]
    both = reference_descriptors(crop[None], mask[None])[0]
    mirror = crop_descriptors(crop[None].flip(-1), mask[None].flip(-1))[0]
    assert len(direct) > 20 and both.shape == (len(direct) + len(mirror), 128)
    assert crop_descriptors(crop[None], torch.zeros_like(mask)[None])[0].shape == (0, 128)  # nothing outside the mask
    # the mirror image's keypoints vote for the reference through its mirror descriptors
    other = reference_descriptors(*(t[None] for t in make_crop(data.coffee(), None, 224, 0.1)))[0]
    assert keypoint_votes([mirror], [direct, other])[0, 0] < keypoint_votes([mirror], [both, other])[0, 0]


def test_references_get_descriptors_that_instance_verification_counts(tmp_path):
    m = FewShotYOLO(YAML)
    img = data.astronaut()
    bank = m.set_references({"astronaut": [(img, [150, 20, 350, 250])], "coffee": [data.coffee()]})
    desc = bank.classes["astronaut"].descriptors
    assert len(desc) == 1 and desc[0].shape[1] == 128 and len(desc[0]) > 20
    assert [len(r) for r in m.model.descriptors] == [2]
    # verification: the votes raise the astronaut's score on the astronaut's crop, and only with votes on
    x = torch.from_numpy(np.ascontiguousarray(img[::2, ::2])).permute(2, 0, 1).float()[None] / 255  # [1, 3, 256, 256]
    m.model.eval().verifier = None  # the raw head output, verified by hand below
    y, raw = m.model.predict(x)
    y[:, :4] = 0
    y[:, :4, 0] = torch.tensor([125.0, 68.0, 100.0, 115.0])  # the reference box (xywh at half size) as a candidate
    y[:, 4:, 0] = 1.0  # the best anchor
    args = (m.model.model[0], x, y, raw["obj"], m.model.prototypes, None, m.model.layouts)
    off = CropVerifier(proposals="head", topk=1, votes=0.0, gamma=1.0, margin=0.0)
    on = CropVerifier(proposals="head", topk=1, votes=0.1, gamma=1.0, margin=0.0)
    s_off, s_on = off(*args, m.model.descriptors)[0, 4:, 0], on(*args, m.model.descriptors)[0, 4:, 0]
    assert s_on[0] > s_off[0] > 0 and s_on[1] == s_off[1] == 0  # (the coffee loses the hard competition)
    torch.testing.assert_close(off(*args, None), off(*args, m.model.descriptors))
    # kept in a saved bank, and back in the model when it is loaded
    path = bank.save(tmp_path / "bank.safetensors")
    torch.testing.assert_close(ReferenceBank.load(path).classes["astronaut"].descriptors[0], desc[0])
    m.set_references(str(path))
    assert m.model.descriptors is not None
    m.set_prototypes([p[0] for p in m.model.prototypes], ["a", "b"])  # prototypes by hand have none
    assert m.model.descriptors is None
    # a tampered file: a descriptor tensor missing -> one line naming the class
    bank_without(path, "c0.desc0", tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"class 'astronaut' lists descriptors but the file has no tensor c0\.desc0"):
        ReferenceBank.load(tmp_path / "bad.safetensors")


def test_set_descriptors_refuses_the_wrong_class_count_or_shape():
    m = FewShotYOLO(YAML)
    m.set_references({"astronaut": [data.astronaut()]})
    with pytest.raises(ValueError, match=r"descriptors for \[2\] classes; the model has prototypes of 1"):
        m.model.set_descriptors([torch.zeros(3, 128), torch.zeros(3, 128)])
    with pytest.raises(ValueError, match=r"descriptors of shape \(3, 64\); expected \[P, 128\]"):
        m.model.set_descriptors([torch.zeros(3, 64)])
