"""Layout descriptors (issue 11, instance search): a grid of masked means of the trunk's maps, for the reference and
its mirror image, compared with candidate crops by instance verification."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from tests.conftest import bank_without
from yolo_fewshot import FewShotYOLO
from yolo_fewshot.nn.layout import class_layouts, layout_descriptors, layout_pool, layout_similarity
from yolo_fewshot.nn.verify import CropVerifier
from yolo_fewshot.references.bank import ReferenceBank

YAML = "yolov8n-lite0-proto.yaml"


def test_layout_pool_is_the_masked_mean_of_each_cell():
    g = torch.Generator().manual_seed(0)
    feat = torch.rand(2, 5, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 4:28, 0:20] = 1  # an object inside part of the window
    mask[1] = 1
    out = layout_pool(feat, mask, 2)
    m = F.interpolate(mask, size=(8, 8), mode="area")
    cells = []
    for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):  # row-major cells, each the mask-weighted mean of its 4x4 block
        f, w = feat[..., 4 * i : 4 * i + 4, 4 * j : 4 * j + 4], m[..., 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
        cells.append((f * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1e-6))
    want = F.normalize(torch.stack(cells, -1).flatten(1), dim=-1)
    torch.testing.assert_close(out, want)
    assert out.shape == (2, 4 * 5)


def test_a_mirrored_candidate_matches_its_reference_through_the_mirror_descriptor():
    m = FewShotYOLO(YAML).model
    ref = torch.from_numpy(data.astronaut()[::4, ::4].copy()).permute(2, 0, 1).float()[None] / 255  # [1, 3, 128, 128]
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 10:118, 20:100] = 1  # off-centre, so the mirror image is a different layout
    lay = layout_descriptors(m.model[0], ref, mask, levels=3)
    assert [t.shape[:2] for t in lay] == [(1, 2)] * 3
    direct = [layout_pool(f, mask) for f in m.model[0](ref)[-3:]]
    for t, d in zip(lay, direct):
        torch.testing.assert_close(t[:, 0], d)
    # a candidate crop that is the mirror image: its own cosine with the mirror descriptor is 1 (max over both)
    layouts = [t.mean(0)[None, None] for t in lay]  # [1, N=1, 2, D]
    flipped = m.model[0](ref.flip(-1))
    cos = layout_similarity(flipped, mask.flip(-1), layouts, torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(cos, torch.ones(1, 1), atol=1e-5, rtol=0)
    without_mirror = [t[:, :, :1] for t in layouts]
    assert layout_similarity(flipped, mask.flip(-1), without_mirror, torch.zeros(1, dtype=torch.long)) < 0.99


def test_class_layouts_average_references_and_need_every_class():
    a = [torch.rand(3, 2, 8), torch.rand(3, 2, 4)]
    b = [torch.rand(1, 2, 8), torch.rand(1, 2, 4)]
    out = class_layouts([a, b], 2)
    assert [t.shape for t in out] == [(2, 2, 8), (2, 2, 4)]
    torch.testing.assert_close(out[0][0], F.normalize(a[0], dim=-1).mean(0))
    assert class_layouts([a, []], 2) is None  # a class without layouts: none at all (they would not compete fairly)


def test_references_get_layouts_that_instance_verification_uses(tmp_path):
    m = FewShotYOLO(YAML)
    img = data.astronaut()
    bank = m.set_references({"astronaut": [(img, [150, 20, 350, 250])], "coffee": [data.coffee()]})
    lay = bank.classes["astronaut"].layouts
    assert len(lay) == 3 and all(t.shape[:2] == (1, 2) for t in lay)
    assert [t.shape[:3] for t in m.model.layouts] == [(1, 2, 2)] * 3
    # instance search compares the layouts (without them: the prototypes, other scores)
    scene = np.ascontiguousarray(np.concatenate([img[:400], data.coffee()[:, :512]], 1)[..., ::-1])
    r1 = m.predict(scene, imgsz=320, conf=0.001, verbose=False)[0]
    saved, m.model.layouts, m.predictor = m.model.layouts, None, None  # (the predictor holds its own model)
    r2 = m.predict(scene, imgsz=320, conf=0.001, verbose=False)[0]
    m.model.layouts = saved
    assert len(r1.boxes) and len(r2.boxes)
    k = min(len(r1.boxes), len(r2.boxes), 5)  # (the best box's score can sit where soft_unit saturates, near 1)
    assert not torch.allclose(r1.boxes.conf.sort().values[-k:], r2.boxes.conf.sort().values[-k:])
    # the verifier's switch: layout=0 compares the prototypes only, even when the references have layouts
    v = CropVerifier(layout=0.0)
    calls = []
    import yolo_fewshot.nn.verify as V

    orig = V.layout_similarity
    V.layout_similarity = lambda *a: calls.append(1) or orig(*a)
    try:
        x = torch.rand(1, 3, 64, 64)
        m.model.eval().verifier = None  # the raw head output, verified by hand below
        y, raw = m.model.predict(x)
        v(m.model.model[0], x, y, raw["obj"], m.model.prototypes, None, m.model.layouts)
        assert calls == []
        CropVerifier()(m.model.model[0], x, y, raw["obj"], m.model.prototypes, None, m.model.layouts)
        assert calls == [1]
    finally:
        V.layout_similarity = orig
    # kept in a saved bank, and back in the model when it is loaded
    path = bank.save(tmp_path / "bank.safetensors")
    back = ReferenceBank.load(path).classes["astronaut"].layouts
    for t, u in zip(lay, back):
        torch.testing.assert_close(t, u)
    m.set_references(str(path))
    assert m.model.layouts is not None
    # new prototypes by hand have no layouts
    m.set_prototypes([p[0] for p in m.model.prototypes], ["a", "b"])
    assert m.model.layouts is None
    # a tampered file: a layout tensor missing -> one line naming the class
    bank_without(path, "c0.layout.l1", tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"class 'astronaut' lists layouts but the file has no tensor c0\.layout\.l1"):
        ReferenceBank.load(tmp_path / "bad.safetensors")


def test_set_layouts_refuses_the_wrong_class_count():
    m = FewShotYOLO(YAML)
    m.set_references({"astronaut": [data.astronaut()]})
    with pytest.raises(ValueError, match=r"expected \[B\|1, 1, 2, D\] per level"):
        m.model.set_layouts([torch.zeros(3, 2, 8)])
