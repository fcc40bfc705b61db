"""Instance search's colour cue: kernel-weighted HSV histograms of boxes, compared by the Bhattacharyya coefficient."""

import colorsys

import numpy as np
import pytest
import torch
from skimage import data

from yolo_fewshot import FewShotYOLO
from yolo_fewshot.nn.colour import BINS, UNRELATED, box_kernel, colour_histograms, colour_similarity, rgb_to_hsv
from yolo_fewshot.nn.verify import CropVerifier
from yolo_fewshot.references.bank import ReferenceBank
from yolo_fewshot.references.crops import make_crop


def _solid(rgb: tuple[float, float, float], s: int = 32) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, s, s).clone()


def test_rgb_to_hsv_matches_colorsys():
    rng = np.random.default_rng(0)
    px = rng.random((500, 3)).astype(np.float32)
    px[:5] = [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 0, 1]]  # black, white, grey, pure hues
    got = rgb_to_hsv(torch.from_numpy(px).T[None, :, :, None])[0, :, :, 0].T.numpy()
    want = np.array([colorsys.rgb_to_hsv(*p) for p in px], dtype=np.float32)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_box_kernel_is_epanechnikov_over_the_box_and_zero_outside():
    masks = torch.zeros(1, 1, 20, 20)
    masks[0, 0, 4:12, 2:18] = 1  # an 8 x 16 box
    k = box_kernel(masks)[0]
    assert k.shape == (20, 20)
    assert torch.all(k[masks[0, 0] == 0] == 0)
    assert k.max() == k[7:9, 9:11].max() and k.max() > 0.95  # peaks at the centre
    torch.testing.assert_close(k[4:12, 2:18], k[4:12, 2:18].flip(0))  # symmetric about the box's centre
    torch.testing.assert_close(k[4:12, 2:18], k[4:12, 2:18].flip(1))
    assert k[4, 2] == 0  # the corners of the box are outside the ellipse


def test_histograms_sum_to_one_and_a_box_weighs_only_its_own_pixels():
    crop = torch.zeros(2, 3, 32, 32)
    crop[:, 0] = 1.0  # red everywhere ...
    crop[:, :, 8:24, 8:24] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]  # ... but a blue box in the middle
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, :, 8:24, 8:24] = 1  # the blue box
    masks[1] = 1  # the whole crop: mostly red
    h = colour_histograms(crop, masks)
    assert h.shape == (2, int(np.prod(BINS)))
    torch.testing.assert_close(h.sum(1), torch.ones(2))
    blue = colour_histograms(_solid((0.0, 0.0, 1.0))[None], torch.ones(1, 1, 32, 32))[0]
    torch.testing.assert_close(h[0], blue)  # the red surroundings do not count
    red = colour_histograms(_solid((1.0, 0.0, 0.0))[None], torch.ones(1, 1, 32, 32))[0].argmax()
    assert h[0, red] == 0 and 0.3 < h[1, red] < 0.7  # the whole crop: red and blue, the centre weighing more
    empty = colour_histograms(crop[:1], torch.zeros(1, 1, 32, 32))  # no box: uniform, not NaN
    torch.testing.assert_close(empty[0], torch.full_like(empty[0], 1 / empty.shape[1]))


def test_bhattacharyya_coefficient_ranks_the_same_colours_first():
    cols = [(0.9, 0.1, 0.1), (0.1, 0.8, 0.1), (0.95, 0.9, 0.2)]  # red, green, yellow
    crops = torch.stack([_solid(c) for c in cols])
    h = colour_histograms(crops, torch.ones(3, 1, 32, 32))
    sim = colour_similarity(h, h[None], 1, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(torch.diagonal(sim), torch.ones(3))
    assert torch.equal(sim.argmax(1), torch.arange(3))
    assert sim.min() >= 0 and sim.max() <= 1 + 1e-6
    # per-image class histograms ([B, N, H]) are taken from each crop's image
    two = torch.stack([h, h.flip(0)])
    got = colour_similarity(h, two, 2, torch.tensor([0, 1, 1]))
    torch.testing.assert_close(got[0], sim[0])
    torch.testing.assert_close(got[1:], sim[1:].flip(1))


def test_instance_search_adds_the_colour_agreement_and_category_search_does_not():
    torch.manual_seed(0)
    photos = (data.chelsea(), data.astronaut(), data.coffee())
    pairs = [make_crop(im, None, 128, 0.1) for im in photos]
    crops, masks = torch.stack([c for c, _ in pairs]), torch.stack([m for _, m in pairs])
    colours = colour_histograms(crops, masks)[None]
    feats = [torch.rand(3, d, 4, 4) for d in (24, 40, 112, 320)]
    protos = [torch.randn(1, 3, 1, d) for d in (40, 112, 320)]
    idx = torch.zeros(3, dtype=torch.long)

    def compare(v: CropVerifier, with_colours=True):
        v.crops = lambda img, i, b, size: (crops, masks)  # the crops themselves, not cut from a scene
        return v.compare(lambda x: feats, torch.rand(1, 3, 64, 64), idx, torch.zeros(3, 4), protos, 3,
                         colours=colours if with_colours else None)  # fmt: skip

    inst = CropVerifier(top1=True, layout=0.0, votes=0.0, hubness=0.0, levels=1)
    plain = compare(inst, with_colours=False)
    bc = colour_similarity(colour_histograms(crops, masks), colours, 1, idx)
    torch.testing.assert_close(compare(inst), plain + 0.15 * (bc - UNRELATED))
    torch.testing.assert_close(compare(CropVerifier(top1=True, layout=0.0, votes=0.0, hubness=0.0, levels=1,
                                                    colour=0.0)), plain)  # fmt: skip
    cat = CropVerifier(top1=False, coco=0.0)
    torch.testing.assert_close(compare(cat), compare(cat, with_colours=False))
    assert torch.equal((plain + 0.15 * (bc - UNRELATED)).diagonal() - plain.diagonal() > 0, torch.ones(3, dtype=bool))


def test_references_carry_their_colour_histograms_into_the_model_and_a_saved_bank(tmp_path):
    m = FewShotYOLO("yolov8n-lite0-proto.yaml")
    bank = m.set_references({"cat": [data.chelsea()], "cup": [data.coffee(), data.coffee()[:, ::-1]]})
    hists = m.model.colours
    assert hists.shape == (1, 2, int(np.prod(BINS)))
    torch.testing.assert_close(hists[0, 1], bank.classes["cup"].colours.mean(0))
    torch.testing.assert_close(hists.sum(-1), torch.ones(1, 2))
    loaded = ReferenceBank.load(bank.save(tmp_path / "bank.safetensors"))
    torch.testing.assert_close(loaded.colour_prototypes(), bank.colour_prototypes())
    m.set_prototypes([torch.randn(2, d) for d in m.model.proto_dims], ["a", "b"])  # by hand: no colours stand for them
    assert m.model.colours is None
    c = bank.classes["cat"]
    with pytest.raises(ValueError, match="colour histograms of class 'x' have shape"):
        bank.add("x", c.embeddings, colours=torch.ones(2, 48))
    with pytest.raises(ValueError, match="negative bins"):
        bank.add("x", c.embeddings, colours=-torch.ones(1, 48))


def test_a_bank_file_with_damaged_colour_histograms_is_one_line(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    m = FewShotYOLO("yolov8n-lite0-proto.yaml")
    path = m.set_references({"cat": [data.chelsea()]}).save(tmp_path / "bank.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    for name, bad, msg in (
        ("wide", torch.ones(2, 48) / 48, r"colour histograms of class 'cat' have shape \(2, 48\); expected \[1, H\]"),
        ("nan", torch.full((1, 48), float("nan")), "colour histograms of class 'cat'"),
        ("negative", -torch.ones(1, 48), "colour histograms of class 'cat' have negative bins"),
    ):
        save_file({**tensors, "c0.colour": bad}, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match=msg) as e:
            ReferenceBank.load(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(e.value) and "rebuild it" in str(e.value)


def test_a_bank_saved_without_colour_histograms_loads_and_says_what_it_lacks(tmp_path):
    import logging

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from ultralytics.utils import LOGGER

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    m = FewShotYOLO("yolov8n-lite0-proto.yaml")
    path = m.set_references({"cat": [data.chelsea()]}).save(tmp_path / "bank.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    old = {k: v for k, v in load_file(str(path)).items() if not k.endswith(".colour")}  # as banks were before
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    seen, keep = [], Keep(logging.WARNING)
    LOGGER.addHandler(keep)
    try:
        m.set_references(str(tmp_path / "old.safetensors"))
    finally:
        LOGGER.removeHandler(keep)
    assert m.model.colours is None and m.model.prototypes is not None  # usable, without the colour cue
    assert any("has no colour histograms" in s and "rebuild it" in s for s in seen), seen
    seen.clear()
    LOGGER.addHandler(keep)
    try:
        m.set_references(str(path))  # a bank with them: no warning, colours set
    finally:
        LOGGER.removeHandler(keep)
    assert not seen and m.model.colours is not None


def test_grey_frames_are_not_compared_by_colour():
    torch.manual_seed(0)
    pairs = [make_crop(im, None, 128, 0.1) for im in (data.chelsea(), data.astronaut(), data.coffee())]
    crops, masks = torch.stack([c for c, _ in pairs]), torch.stack([m for _, m in pairs])
    colours = colour_histograms(crops, masks)[None]
    feats = [torch.rand(3, d, 4, 4) for d in (24, 40, 112, 320)]
    protos = [torch.randn(1, 3, 1, d) for d in (40, 112, 320)]
    idx = torch.tensor([0, 1, 1])  # the first crop from a colour frame, the others from a grey one
    scenes = torch.rand(2, 3, 64, 64)
    scenes[1] = scenes[1, :1]  # grey: three equal channels (an infrared frame)
    noisy = scenes.clone()
    noisy[1] += torch.randn(3, 64, 64) * 0.002  # a grey frame saved as a colour JPEG: a little chroma noise

    def compare(colour: float, img: torch.Tensor) -> torch.Tensor:
        v = CropVerifier(top1=True, layout=0.0, votes=0.0, hubness=0.0, levels=1, colour=colour)
        v.crops = lambda im, i, b, size: (crops, masks)  # the crops themselves, not cut from a scene
        return v.compare(lambda x: feats, img, idx, torch.zeros(3, 4), protos, 3, colours=colours)

    for img in (scenes, noisy):
        on, off = compare(0.15, img), compare(0.0, img)
        torch.testing.assert_close(on[1:], off[1:])  # grey frame: no colour term
        assert not torch.allclose(on[0], off[0])  # colour frame: compared
