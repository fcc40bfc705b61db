"""Keypoint proposals (issue 16): a reference's SIFT keypoints find the same instance in a scene, as one candidate box
per class that crop verification scores like every other."""

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from skimage import data
from torchvision.ops import box_iou

from yolo_fewshot import FewShotYOLO
from yolo_fewshot.nn.keypoint_match import KeypointTemplate, features, keypoint_boxes, match
from yolo_fewshot.nn.verify import CropVerifier, proposal_sources
from yolo_fewshot.references.bank import ReferenceBank

YAML = "yolov8n-lite0-proto.yaml"


def _scene() -> tuple[np.ndarray, np.ndarray, list[float]]:
    """scikit-image's astronaut (the reference, whole photo) shrunk, rotated 8 degrees and pasted on gravel:
    (reference RGB, scene RGB 320x320, the box of the rotated photo's outline, xyxy)."""
    ref = data.astronaut()
    obj = cv2.resize(ref, (150, 150), interpolation=cv2.INTER_AREA)
    rot = cv2.getRotationMatrix2D((75, 75), 8, 1.0)
    obj = cv2.warpAffine(obj, rot, (150, 150), borderMode=cv2.BORDER_REFLECT)
    scene = cv2.resize(np.repeat(data.gravel()[..., None], 3, -1), (320, 320))
    x0, y0 = 140, 90
    scene[y0 : y0 + 150, x0 : x0 + 150] = obj
    half = 75 * (np.cos(np.radians(8)) + np.sin(np.radians(8)))  # the rotated square's half extent
    return ref, scene, [x0 + 75 - half, y0 + 75 - half, x0 + 75 + half, y0 + 75 + half]


def test_template_matches_a_scaled_rotated_copy():
    ref, scene, box = _scene()
    t = KeypointTemplate.from_image(ref)
    assert len(t) > 50 and t.descriptors.shape == (len(t), 128) and t.size == (512.0, 512.0)
    grey = cv2.cvtColor(scene, cv2.COLOR_RGB2GRAY)
    found, inliers = match(t, features(grey), (320, 320))
    assert inliers >= 20
    assert box_iou(torch.from_numpy(found)[None], torch.tensor([box], dtype=torch.float)).item() >= 0.9


def test_template_of_a_box_keeps_the_box_frame():
    ref = data.astronaut()
    whole = KeypointTemplate.from_image(ref)
    part = KeypointTemplate.from_image(ref, [100, 50, 300, 250])
    assert part.size == (200.0, 200.0)
    # every keypoint of the box template lies in the box (box-relative coordinates)
    assert (part.points >= -1).all() and (part.points <= 201).all()
    assert 0 < len(part) < len(whole)


def test_no_match_in_an_unrelated_scene_and_classes_without_keypoints():
    ref, _, _ = _scene()
    t = KeypointTemplate.from_image(ref)
    gravel = cv2.resize(np.repeat(data.gravel()[..., None], 3, -1), (320, 320))
    empty = KeypointTemplate(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), (10.0, 10.0))
    boxes, inliers = keypoint_boxes([[t], [], [empty]], gravel)
    assert boxes.shape == (3, 4) and inliers.tolist() == [0, 0, 0] and not boxes.any()


def test_proposals_setting_joins_sources():
    assert proposal_sources("both") == {"head", "centernet"}
    assert proposal_sources("centernet+keypoints") == {"centernet", "keypoints"}
    assert CropVerifier(proposals="head+keypoints").extra_columns(3) == 3
    assert CropVerifier(proposals="centernet+keypoints", centernet_topk=7).extra_columns(2) == 9
    for bad in ("head+head", "sift", "head+", ""):
        with pytest.raises(ValueError, match=r"^proposals=.* must be one of head, centernet, keypoints"):
            CropVerifier(proposals=bad)


def test_keypoint_proposal_is_the_top_detection_through_the_predictor():
    ref, scene, box = _scene()
    m = FewShotYOLO(YAML)
    m.set_references({"astronaut": [ref]})  # instance search's default candidates include keypoints: found
    assert len(m.model.keypoints) == 1 and len(m.model.keypoints[0][0]) > 50
    m.model.set_verify(True, top1=False)  # category search's default (both): none are found, they cost time
    m.set_references({"astronaut": [ref]})
    assert m.model.keypoints == [[]]
    bgr = np.ascontiguousarray(scene[..., ::-1])
    with pytest.raises(ValueError, match=r"^proposals=keypoints needs the references' keypoints.*pass refs= with it"):
        m.predict(bgr, proposals="keypoints", imgsz=320, verbose=False)
    r = m.predict(bgr, refs={"astronaut": [ref]}, proposals="keypoints", conf=0.001, imgsz=320, verbose=False)[0]
    assert len(m.model.keypoints) == 1 and len(m.model.keypoints[0][0]) > 50  # found: the proposals asked for them
    assert len(r.boxes) >= 1
    top = r.boxes.xyxy[r.boxes.conf.argmax()][None]
    assert box_iou(top, torch.tensor([box], dtype=torch.float)).item() >= 0.8
    # prototypes set by hand have no keypoints: refused with the same line, not an empty answer
    m.set_prototypes([p[0] for p in m.model.prototypes], ["astronaut"])
    assert m.model.keypoints == []
    with pytest.raises(ValueError, match="needs the references' keypoints"):
        m.predict(bgr, proposals="keypoints", imgsz=320, verbose=False)


def test_bank_keeps_keypoints_and_refuses_broken_ones(tmp_path):
    ref, _, _ = _scene()
    m = FewShotYOLO(YAML)
    bank = m.set_references({"astronaut": [(ref, [100, 50, 300, 250])]}, keypoints=True)
    t = bank.classes["astronaut"].keypoints[0]
    path = bank.save(tmp_path / "bank.safetensors")
    back = ReferenceBank.load(path).classes["astronaut"].keypoints
    assert len(back) == 1 and back[0].size == t.size
    np.testing.assert_array_equal(back[0].points, t.points)
    np.testing.assert_array_equal(back[0].descriptors, t.descriptors)
    m.set_references(str(path))  # a loaded bank's keypoints reach the model
    assert len(m.model.keypoints[0][0]) == len(t)
    # a tampered file: descriptors of the wrong width -> one line naming the class and the shapes
    tensors = load_file(str(path))
    tensors["c0.kp0.descriptors"] = tensors["c0.kp0.descriptors"][:, :64].contiguous()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"class 'astronaut' keypoints c0\.kp0 have shapes .* expected \[P, 2\]"):
        ReferenceBank.load(tmp_path / "bad.safetensors")


def test_validation_uses_no_stale_keypoints_and_keeps_the_users(tmp_path, monkeypatch):
    from yolo_fewshot.data.toy import make_dataset
    from yolo_fewshot.engine.val import FewShotValidator

    seen = []
    pre = FewShotValidator.preprocess

    def spy(self, batch):
        batch = pre(self, batch)
        seen.append((dict(self.fs_model.names), list(self.fs_model.keypoints)))
        return batch

    monkeypatch.setattr(FewShotValidator, "preprocess", spy)
    ref, _, _ = _scene()
    m = FewShotYOLO(YAML)
    m.set_references({"astronaut": [ref]}, keypoints=True)
    kps = m.model.keypoints
    yaml = make_dataset(tmp_path / "data", n_train=4, n_val=4)
    m.val(data=str(yaml), shots="1", seeds=1, imgsz=64, batch=4, workers=0, plots=False, project=str(tmp_path),
          name="v", verbose=False, proposals="centernet+keypoints")  # fmt: skip
    # the draw's classes (the toy set's) have no keypoints: the user's astronaut keypoints never stand in for them
    assert seen and all(len(names) == 4 and k == [] for names, k in seen)
    assert m.model.names == {0: "astronaut"} and m.model.keypoints == kps  # the user's references are intact
