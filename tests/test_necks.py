"""CHEAF and PSALM with every attention kernel: shapes, bypass, class batching, gradients, determinism, ONNX."""

import pytest
import torch

from tests.conftest import onnx_roundtrip
from yolo_fewshot.nn.attention import ATTENTIONS
from yolo_fewshot.nn.cheaf import CHEAF
from yolo_fewshot.nn.psalm import PSALM
from yolo_fewshot.nn.select import Select

NECKS = [CHEAF, PSALM]
LEVELS = {4: ([8, 16, 24, 32], [16, 16, 32, 32]), 3: ([16, 24, 32], [16, 32, 32])}
D = 12


def _feats(levels, b=2, size=(64, 48)):
    c_in = LEVELS[levels][0]
    first = 4 if levels == 4 else 8
    return [torch.randn(b, c, size[0] // (first * 2**i), size[1] // (first * 2**i)) for i, c in enumerate(c_in)]


def _protos(levels, n=3, m=1, b=1):
    return [torch.randn(b, n, m, D) for _ in range(levels)]


def _neck(cls, levels, attn="linear", **kw):
    c_in, c_out = LEVELS[levels]
    return cls(c_in, c_out, D, attn=attn, heads=4, **kw)


@pytest.mark.parametrize("cls", NECKS)
@pytest.mark.parametrize("attn", sorted(ATTENTIONS))
@pytest.mark.parametrize("levels,size", [(4, (64, 64)), (3, (80, 64))])
def test_shapes_with_and_without_prototypes(cls, attn, levels, size):
    neck = _neck(cls, levels, attn).eval()
    x = _feats(levels, size=size)
    out = neck(x)
    assert [o.shape for o in out] == [(2, c, *xi.shape[2:]) for c, xi in zip(LEVELS[levels][1], x)]
    neck.prototypes = _protos(levels, n=3)
    out = neck(x)
    assert [o.shape for o in out] == [(6, c, *xi.shape[2:]) for c, xi in zip(LEVELS[levels][1], x)]


@pytest.mark.parametrize("cls", NECKS)
@pytest.mark.parametrize("attn", ["linear", "softmax", "ssm"])
def test_class_batching_equals_one_class_at_a_time(cls, attn):
    neck = _neck(cls, 4, attn).eval()
    x, protos = _feats(4), _protos(4, n=3)
    neck.prototypes = protos
    full = [o.unflatten(0, (2, 3)) for o in neck(x)]
    for n in range(3):
        neck.prototypes = [p[:, n : n + 1] for p in protos]
        for f, o in zip(full, neck(x)):
            torch.testing.assert_close(f[:, n], o, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", NECKS)
def test_per_image_prototypes_equal_shared_ones(cls):
    neck = _neck(cls, 4).eval()
    x, protos = _feats(4), _protos(4, n=2)
    neck.prototypes = protos
    shared = neck(x)
    neck.prototypes = [p.expand(2, -1, -1, -1).clone() for p in protos]
    for a, b in zip(shared, neck(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", NECKS)
@pytest.mark.parametrize("attn", sorted(ATTENTIONS))
def test_every_parameter_gets_gradient(cls, attn):
    neck = _neck(cls, 4, attn)
    neck.prototypes = _protos(4, n=2)
    sum(o.square().mean() for o in neck(_feats(4))).backward()
    missing = [k for k, p in neck.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing


@pytest.mark.parametrize("cls", NECKS)
def test_bypass_trains_the_whole_path(cls):
    """Without prototypes only the prototype projections and modulation are idle."""
    neck = _neck(cls, 4)
    sum(o.square().mean() for o in neck(_feats(4))).backward()
    idle = {k.split(".")[0] for k, p in neck.named_parameters() if p.grad is None or not p.grad.any()}
    assert idle <= {"support_proj", "mod_scale", "mod_bias"}


@pytest.mark.parametrize("cls", NECKS)
def test_deterministic(cls):
    x, protos = _feats(4), _protos(4)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        neck = _neck(cls, 4).eval()
        neck.prototypes = protos
        outs.append(neck(x))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("cls", NECKS)
@pytest.mark.parametrize("attn", sorted(ATTENTIONS))
def test_onnx_parity_with_baked_prototypes(cls, attn, tmp_path):
    neck = _neck(cls, 4, attn).eval()
    neck.prototypes = _protos(4, n=2)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.neck = neck

        def forward(self, a, b, c, d):
            return tuple(self.neck([a, b, c, d]))

    x = _feats(4)
    outs = onnx_roundtrip(Wrap().eval(), tuple(x), tmp_path)
    for o, r in zip(outs, Wrap()(*x)):
        torch.testing.assert_close(torch.from_numpy(o), r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls", NECKS)
def test_ablation_switches(cls):
    kw = {"pyramid": False, "short_long": False} if cls is CHEAF else {"pyramid": False, "conv_qk": False}
    neck = _neck(cls, 4, **kw).eval()
    neck.prototypes = _protos(4)
    assert [o.shape[0] for o in neck(_feats(4))] == [6] * 4
    assert sum(p.numel() for p in neck.parameters()) < sum(p.numel() for p in _neck(cls, 4).parameters())


@pytest.mark.parametrize("cls", NECKS)
def test_parameter_free_residual(cls):
    c_in, c_out = LEVELS[3][0], [32, 48, 32]
    neck = cls(c_in, c_out, D, residual="repeat").eval()
    neck.prototypes = _protos(3)
    assert [o.shape[:2] for o in neck(_feats(3))] == [(6, c) for c in c_out]
    conv = cls(c_in, c_out, D, residual="conv")
    saved = sum(p.numel() for p in conv.res_proj.parameters())
    assert saved > 0 and sum(p.numel() for p in neck.parameters()) == sum(p.numel() for p in conv.parameters()) - saved
    with pytest.raises(ValueError, match="multiples"):
        cls([8, 16, 24], [12, 16, 24], D, residual="repeat")


def test_bad_construction_is_clear():
    with pytest.raises(ValueError, match="3 \\(P3–P5\\) or 4"):
        PSALM([8, 16], [8, 16], D)
    with pytest.raises(ValueError, match="proto_dims"):
        PSALM([8, 16, 24], [8, 16, 24], [D, D])
    with pytest.raises(ValueError, match="multi-level"):
        Select.yaml_build([64], [0], {})
