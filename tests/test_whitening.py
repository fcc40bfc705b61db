"""Instance search's learned whitening: the fit, the verifier's use, the fit from a benchmark fold, the saved file."""

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.test_hubness import DIMS, _classes, _crops, _trunk
from yolo_fewshot import FewShotYOLO
from yolo_fewshot.nn.hubness import bank_embeddings, bank_similarity, whiten_bank
from yolo_fewshot.nn.whitening import PREFIX, Whitening, check_whitening, fit_whitening, whiten, whiten_cells
from yolo_fewshot.pretrained import load_pretrained, save_pretrained


def _pairs(n_ids: int, per: int, d: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Objects ``[n_ids, d]``; their scene views ``[n_ids * per, d]`` moved far along two fixed nuisance directions
    (the scene's light and clutter), their photos ``[n_ids, d]`` nearly clean."""
    nuisance = torch.randn(2, d, generator=torch.Generator().manual_seed(100)) * 3  # the same for every draw
    g = torch.Generator().manual_seed(seed)
    ids = torch.randn(n_ids, d, generator=g)
    scene = ids.repeat_interleave(per, 0) + torch.randn(n_ids * per, 2, generator=g) @ nuisance
    scene = scene + 0.3 * torch.randn(n_ids * per, d, generator=g)
    photo = ids + 0.1 * torch.randn(n_ids, d, generator=g)
    return scene, photo, torch.arange(n_ids).repeat_interleave(per)


def _top1(scene: torch.Tensor, photo: torch.Tensor, label: torch.Tensor) -> float:
    return ((F.normalize(scene, dim=-1) @ F.normalize(photo, dim=-1).T).argmax(1) == label).float().mean().item()


def test_the_fit_divides_out_the_nuisance_on_objects_it_never_saw():
    scene, photo, label = _pairs(60, 4)
    mean, matrix = fit_whitening(scene, photo[label])
    torch.testing.assert_close(matrix, matrix.T)  # symmetric: x @ W applies it
    assert mean.shape == (24,) and matrix.shape == (24, 24)
    test_scene, test_photo, test_label = _pairs(30, 3, seed=1)  # other identities, the same kind of nuisance
    raw = _top1(test_scene, test_photo, test_label)
    white = _top1(whiten(test_scene, mean, matrix), whiten(test_photo, mean, matrix), test_label)
    assert raw < 0.7 and white > raw + 0.2, (raw, white)


def test_identity_whitening_is_plain_normalisation_and_empty_cells_stay_empty():
    x = torch.randn(5, 8)
    eye, zero = torch.eye(8), torch.zeros(8)
    torch.testing.assert_close(whiten(x, zero, eye), F.normalize(x, dim=-1))
    cells = torch.randn(3, 4, 8)
    cells[:, 1] = 0  # a layout cell without object pixels
    out = whiten_cells(cells.flatten(1), torch.randn(8), torch.randn(8, 8)).reshape(3, 4, 8)
    assert out[:, 1].abs().max() == 0 and torch.allclose(out.flatten(1).norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match=r"matching \[P, D\] pairs"):
        fit_whitening(torch.zeros(4, 8), torch.zeros(3, 8))


def _identity(dims=DIMS) -> dict[str, torch.Tensor]:
    return {k: v for i, d in enumerate(dims) for k, v in ((f"mean.{i}", torch.zeros(d)), (f"matrix.{i}", torch.eye(d)))}


def _random(dims=DIMS, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, d in enumerate(dims):
        a = torch.randn(d, d, generator=g) / d**0.5
        out[f"mean.{i}"], out[f"matrix.{i}"] = 0.1 * torch.randn(d, generator=g), a @ a.T + 0.1 * torch.eye(d)
    return out


def test_the_verifier_compares_whitened_candidates_references_and_bank():
    trunk = _trunk()
    protos, layouts = _classes(trunk, 3)
    crops, masks = _crops(4)
    hub = bank_embeddings(trunk, *_crops(6, seed=5))
    args = (trunk, torch.zeros(1, 3, 64, 64), torch.zeros(4, dtype=torch.long), torch.zeros(4, 4), protos, 3, layouts)
    from yolo_fewshot.nn.verify import CropVerifier

    means = CropVerifier(top1=True, votes=0.0, colour=0.0, layout=0.0)
    means.crops = lambda img, i, b, size: (crops, masks)
    # an identity whitening leaves masked-mean cosines as they were (layouts' cells are then each normalised: each
    # cell counts alike, rather than by its norm)
    torch.testing.assert_close(means.compare(*args, hub=hub, white=_identity()), means.compare(*args, hub=hub))
    v = CropVerifier(top1=True, votes=0.0, colour=0.0)
    v.crops = means.crops
    plain = v.compare(*args, hub=hub)
    white = v.compare(*args, hub=hub, white=_random())
    assert (white - plain).abs().max() > 0.01  # a real whitening changes the similarities
    off = CropVerifier(top1=True, votes=0.0, colour=0.0, whiten=False)
    off.crops = v.crops
    torch.testing.assert_close(off.compare(*args, hub=hub, white=_random()), plain)  # whiten=False: raw cosines
    cat = CropVerifier(top1=False)  # category search: raw cosines by default (the pairs are of one object)
    cat.crops = v.crops
    torch.testing.assert_close(cat.compare(*args, white=_random()), cat.compare(*args))
    # the hubness bank is compared in the same whitened space as the candidates
    w = Whitening(_random())
    sim = bank_similarity(whiten_bank(hub, w), protos, None, 0.0, 3, w)
    q = [w(p.mean(2), i, 3) for i, p in enumerate(protos)]
    e = [w(hub[f"means.{i}"], i, 3) for i in range(3)]
    torch.testing.assert_close(sim, sum(a @ b.T for a, b in zip(q, e)) / 3)


def test_a_whitening_of_fewer_levels_leaves_the_others_raw():
    w = Whitening({k: v for k, v in _random(DIMS[-1:]).items()})
    assert w.levels == 1 and w.level(2, 3) is not None and w.level(0, 3) is None  # its one level is the last (P5)
    x = torch.randn(4, 40)
    torch.testing.assert_close(w(x, 0, 3), F.normalize(x, dim=-1))


def test_whitening_travels_with_a_pretrained_file_and_a_bad_one_is_one_line(tmp_path):
    model = FewShotYOLO("yolov8n-lite0-proto.yaml").model
    path = save_pretrained(model, tmp_path / "a.safetensors")
    assert getattr(load_pretrained(path), "whitening", None) is None  # a model without one: raw cosines
    model.whitening = _random()
    path = save_pretrained(model, tmp_path / "b.safetensors")
    loaded = load_pretrained(path).whitening
    assert check_whitening(loaded, model.proto_dims) == 3
    torch.testing.assert_close(loaded["matrix.2"], model.whitening["matrix.2"])  # kept in fp32
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    cases = {
        "nan": ({**tensors, PREFIX + "mean.0": torch.full((40,), float("nan"))}, "non-finite"),
        "dims": ({**tensors, PREFIX + "mean.0": torch.zeros(7), PREFIX + "matrix.0": torch.eye(7)}, "does not fit"),
        "square": ({**tensors, PREFIX + "matrix.1": torch.zeros(112, 5)}, r"must be \[D\] and \[D, D\]"),
        "missing": ({k: v for k, v in tensors.items() if k != PREFIX + "matrix.1"}, "expected mean.<l> and"),
    }
    for name, (t, msg) in cases.items():
        save_file(t, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match=msg) as e:
            load_pretrained(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(e.value) and f"{name}.safetensors" in str(e.value)


def test_the_trainer_fits_it_from_a_benchmark_folds_identities_and_skips_data_without_them(tmp_path):
    from ultralytics.data.utils import check_det_dataset

    from tests.test_benchmark import synthetic_sources
    from yolo_fewshot.data import benchmark as bm
    from yolo_fewshot.data.benchmark import identity_pairs
    from yolo_fewshot.engine.train import training_whitening

    src = synthetic_sources()
    y, _ = bm.build_fold(src, tmp_path, 0, size=96, n_train=12, n_val=8, n_novel_train=4, n_instance=6)
    objects, views = identity_pairs(y.parent / "fold0", "train", src.rgba, photos=2)
    assert objects and all(len(b) == len(s) for _, b, s in objects)
    assert set(views) == {s for _, _, ss in objects for s in ss} and all(len(v) == 2 for v in views.values())
    model = FewShotYOLO("yolov8n-lite0-proto.yaml").model
    white = training_whitening(model, check_det_dataset(str(y)), rgba=src.rgba)
    assert check_whitening(white, model.proto_dims) == 3
    torch.testing.assert_close(white["matrix.2"], white["matrix.2"].T)
    with pytest.raises(FileNotFoundError, match="carries no object identities"):
        identity_pairs(tmp_path / "nowhere", "train", src.rgba)


def test_crop_side_and_calibration_follow_the_whitening():
    from yolo_fewshot.nn.verify import CATEGORY_SIZE, WHITENED_GAMMA, WHITENED_SIZE, CropVerifier

    v = CropVerifier()  # instance search
    assert v.whitened(_random()) and not v.whitened(None)  # a model without one: raw cosines
    assert v.crop_size(True) == WHITENED_SIZE == 224 and v.crop_size(False) == CATEGORY_SIZE == 128
    assert not CropVerifier(top1=False).whitened(_random()) and not CropVerifier(whiten=False).whitened(_random())
    assert CropVerifier(size=160).crop_size(True) == 160  # an explicit side wins
    cos, obj, idx = torch.tensor([[0.8, 0.3]]), torch.tensor([0.6]), torch.zeros(1, dtype=torch.long)
    v = CropVerifier(once=1.0)
    raw, white = v.score(cos, obj, idx, 1, whitened=False), v.score(cos, obj, idx, 1, whitened=True)
    torch.testing.assert_close(white, raw ** (WHITENED_GAMMA / 0.5))  # its own calibration power, the same order


def test_the_models_statistics_are_whitened_once_not_per_frame():
    from yolo_fewshot.nn.verify import whitened_statistics

    white, hub = _random(), bank_embeddings(_trunk(), *_crops(6, seed=5))
    w1, b1 = whitened_statistics(white, hub)
    w2, b2 = whitened_statistics(white, hub)
    assert w1 is w2 and b1 is b2  # the same model's statistics: reused
    torch.testing.assert_close(b1["means.2"], whiten(hub["means.2"], white["mean.2"], white["matrix.2"]))
    w3, b3 = whitened_statistics(dict(white), hub)  # another model's: made anew
    assert w3 is not w1 and b3 is not b1
