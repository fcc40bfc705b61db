"""Instance search's hubness correction (CSLS): the bank, the offsets, the verifier's use, the pretrained file."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from yolo_fewshot import FewShotYOLO
from yolo_fewshot.nn.hubness import BANK_PREFIX, bank_embeddings, bank_similarity, check_bank, hubness_offset
from yolo_fewshot.nn.layout import layout_descriptors
from yolo_fewshot.nn.verify import CropVerifier
from yolo_fewshot.pretrained import load_pretrained, save_pretrained

DIMS = (40, 112, 320)  # Lite0's P3-P5


def _trunk(seed: int = 0):
    """A fixed random trunk: ``[K, 3, S, S]`` -> four level maps (P2..P5), deterministic per input."""
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(d, 3, generator=g) for d in (24, *DIMS)]

    def trunk(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.einsum("dc,kchw->kdhw", wi, torch.nn.functional.avg_pool2d(x - 0.5, 2**i))
                for i, wi in enumerate(w, 2)]  # fmt: skip

    return trunk


def _crops(k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    crops = torch.rand(k, 3, 64, 64, generator=g)
    masks = torch.zeros(k, 1, 64, 64)
    masks[:, :, 6:58, 6:58] = 1
    return crops, masks


def _classes(trunk, k: int, seed: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prototypes ``[1, N, 1, D]`` and layouts ``[1, N, 2, G*G*D]`` per level of ``k`` crops, one class each."""
    from yolo_fewshot.encoders.base import masked_mean

    crops, masks = _crops(k, seed)
    protos = [masked_mean(f, masks)[None, :, None] for f in trunk(crops)[-3:]]
    layouts = [t[None] for t in layout_descriptors(trunk, crops, masks)]
    return protos, layouts


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_the_bank_is_compared_exactly_as_verification_compares_a_candidate(share):
    trunk = _trunk()
    protos, layouts = _classes(trunk, 3)
    crops, masks = _crops(5)
    bank = bank_embeddings(trunk, crops, masks)
    assert check_bank(bank, DIMS) == 5
    v = CropVerifier(top1=True, layout=share, votes=0.0, hubness=0.0)
    v.crops = lambda img, i, b, size: (crops, masks)  # the bank's own crops as the candidates
    idx = torch.zeros(5, dtype=torch.long)
    want = v.compare(trunk, torch.zeros(1, 3, 64, 64), idx, torch.zeros(5, 4), protos, 3, layouts)  # [C, N]
    got = bank_similarity(bank, protos, layouts, share, 3)  # [1, N, K]
    torch.testing.assert_close(got[0].T, want, atol=1e-5, rtol=1e-5)


def test_offsets_are_the_centred_mean_of_the_k_nearest_and_zero_for_one_class():
    sim = torch.tensor([[[0.9, 0.8, 0.1, 0.0], [0.3, 0.2, 0.1, 0.0], [0.5, 0.5, 0.5, 0.5]]])  # [1, 3, 4]
    h = torch.tensor([0.85, 0.25, 0.5])  # the mean of each class's 2 nearest
    torch.testing.assert_close(hubness_offset(sim, k=2, lam=0.5), 0.5 * (h - h.mean())[None])
    assert hubness_offset(sim, k=2).sum().abs() < 1e-6  # centred: the scores' overall scale stays
    assert torch.equal(hubness_offset(sim[:, :1], k=2), torch.zeros(1, 1))
    torch.testing.assert_close(hubness_offset(sim, k=99), 0.5 * (sim.mean(-1) - sim.mean()))  # k beyond the bank


def test_a_hub_reference_stops_taking_another_objects_candidate():
    # class 0 is every bank object (a hub), class 1 none; the candidate is nearer class 0 by the raw cosine
    d = DIMS[-1]
    a, b = torch.eye(d)[0], torch.eye(d)[1]
    e = torch.nn.functional.normalize(0.6 * a + 0.55 * b, dim=0)
    trunk = lambda x: [e[None, :, None, None].expand(len(x), d, 4, 4)]  # noqa: E731  (crops -> their P5 map)
    protos = [torch.stack([a, b])[None, :, None]]  # [1, 2, 1, D]
    crops, masks = torch.zeros(1, 3, 32, 32), torch.ones(1, 1, 32, 32)
    v = CropVerifier(top1=True, layout=0.0, votes=0.0, levels=1)
    v.crops = lambda img, i, bx, size: (crops, masks)
    args = (trunk, torch.zeros(1, 3, 64, 64), torch.zeros(1, dtype=torch.long), torch.zeros(1, 4), protos, 2)
    raw = v.compare(*args)
    torch.testing.assert_close(raw[0], torch.stack([e @ a, e @ b]))
    assert raw[0].argmax() == 0
    hub = {"means.0": a.expand(8, d).clone(), "layouts.0": torch.zeros(8, 4 * d)}
    on = v.compare(*args, hub=hub)
    torch.testing.assert_close(on[0], raw[0] - 0.5 * torch.tensor([0.5, -0.5]))  # h = (1, 0), centred, lam 0.5
    assert on[0].argmax() == 1
    score = v.score(on, torch.ones(1), torch.zeros(1, dtype=torch.long), 1)
    assert score[0, 1] > score[0, 0]  # and the verified score follows


def test_category_search_and_single_references_are_unchanged():
    trunk = _trunk()
    protos, layouts = _classes(trunk, 3)
    crops, masks = _crops(4)
    hub = bank_embeddings(trunk, *_crops(6, seed=5))
    idx = torch.zeros(4, dtype=torch.long)
    args = (trunk, torch.zeros(1, 3, 64, 64), idx, torch.zeros(4, 4))
    for v in (CropVerifier(top1=False), CropVerifier(top1=True, hubness=0.0)):  # category search: off by default
        v.crops = lambda img, i, b, size: (crops, masks)
        torch.testing.assert_close(v.compare(*args, protos, 3, layouts, hub=hub), v.compare(*args, protos, 3, layouts))
    v = CropVerifier(top1=True, votes=0.0)
    v.crops = lambda img, i, b, size: (crops, masks)
    one = [p[:, :1] for p in protos], [t[:, :1] for t in layouts]
    torch.testing.assert_close(v.compare(*args, one[0], 1, one[1], hub=hub), v.compare(*args, one[0], 1, one[1]))
    off = hubness_offset(bank_similarity(hub, protos, layouts, 0.5, 3))[0]  # three classes: corrected
    assert off.abs().max() > 0.01
    plain = v.compare(*args, protos, 3, layouts)
    torch.testing.assert_close(v.compare(*args, protos, 3, layouts, hub=hub), plain - off)


def test_the_bank_travels_with_a_pretrained_file_and_a_bad_one_is_one_line(tmp_path):
    model = FewShotYOLO("yolov8n-lite0-proto.yaml").model
    path = save_pretrained(model, tmp_path / "a.safetensors")
    assert getattr(load_pretrained(path), "hubness_bank", None) is None  # a model without one: no correction
    bank = bank_embeddings(model.model[0], *_crops(6))
    model.hubness_bank = {k: v.half() for k, v in bank.items()}
    path = save_pretrained(model, tmp_path / "b.safetensors")
    loaded = load_pretrained(path).hubness_bank
    assert set(loaded) == set(bank) and all(loaded[k].shape == bank[k].shape for k in bank)
    torch.testing.assert_close(loaded["means.2"].float(), bank["means.2"], atol=2e-3, rtol=0)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    cases = {
        "nan": ({**tensors, BANK_PREFIX + "means.0": torch.full_like(tensors[BANK_PREFIX + "means.0"], float("nan"))},
                "non-finite"),
        "dims": ({**tensors, BANK_PREFIX + "means.0": torch.zeros(6, 7, dtype=torch.half)}, "does not fit"),
        "rows": ({**tensors, BANK_PREFIX + "means.1": torch.zeros(5, 112, dtype=torch.half)}, "one K > 0"),
        "missing": ({k: v for k, v in tensors.items() if k != BANK_PREFIX + "layouts.1"}, "expected means.<l> and"),
    }  # fmt: skip
    for name, (t, msg) in cases.items():
        save_file(t, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match=msg) as e:
            load_pretrained(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(e.value) and f"{name}.safetensors" in str(e.value)
