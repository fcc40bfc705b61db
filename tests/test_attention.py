"""Every registered attention kernel: shapes, bypass, support use, gradients, determinism, ONNX; exact relations."""

import pytest
import torch

from tests.conftest import onnx_roundtrip
from yolo_fewshot.nn.attention import ATTENTIONS, SoftmaxAttention, SupportAttention, build_attention
from yolo_fewshot.nn.attention.ssm import selective_scan, selective_scan_reference

KERNELS = sorted(ATTENTIONS)
C = 16


def _inputs(b=2, hw=(6, 5), n=3, m=2):
    return torch.randn(b, hw[0] * hw[1], C), torch.randn(1, n, m, C)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("hw", [(6, 6), (5, 4)])
def test_shapes_and_bypass(name, hw):
    attn = build_attention(name, C, 4).eval()
    x, s = _inputs(hw=hw)
    assert attn(x, s, hw).shape == (2 * 3, x.shape[1], C)
    assert attn(x, None, hw).shape == x.shape
    per_image = torch.randn(2, 3, 2, C)
    assert attn(x, per_image, hw).shape == (6, x.shape[1], C)


@pytest.mark.parametrize("name", KERNELS)
def test_output_depends_on_support(name):
    attn = build_attention(name, C, 4).eval()
    x, s = _inputs()
    a, b = attn(x, s, (6, 5)), attn(x, s + torch.randn_like(s), (6, 5))
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("name", KERNELS)
def test_classes_are_independent(name):
    """Row b*N+n of a 3-class call equals the 1-class call with class n (no leakage between classes)."""
    attn = build_attention(name, C, 4).eval()
    x, s = _inputs()
    full = attn(x, s, (6, 5)).unflatten(0, (2, 3))
    for n in range(3):
        torch.testing.assert_close(full[:, n], attn(x, s[:, n : n + 1], (6, 5)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", KERNELS)
def test_every_parameter_gets_gradient(name):
    attn = build_attention(name, C, 4)
    x, s = _inputs()
    attn(x, s, (6, 5)).square().mean().backward()
    missing = [k for k, p in attn.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing


@pytest.mark.parametrize("name", KERNELS)
def test_deterministic(name):
    x, s = _inputs()
    torch.manual_seed(1)
    a = build_attention(name, C, 4).eval()(x, s, (6, 5))
    torch.manual_seed(1)
    b = build_attention(name, C, 4).eval()(x, s, (6, 5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", KERNELS)
def test_onnx_parity(name, tmp_path):
    attn = build_attention(name, C, 4).eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x, s):
            return self.attn(x, s, (6, 5))

    x, s = _inputs()
    (out,) = onnx_roundtrip(Wrap().eval(), (x, s), tmp_path)
    torch.testing.assert_close(torch.from_numpy(out), Wrap()(x, s), atol=1e-4, rtol=1e-4)


def test_linear_fast_path_equals_reference():
    attn = build_attention("linear", C, 4)
    x, s = _inputs()
    qk, gate = torch.randn_like(x), torch.rand(6, C)
    ref = SupportAttention.forward(attn, x, s, (6, 5), x_qk=qk, gate=gate)
    torch.testing.assert_close(attn(x, s, (6, 5), x_qk=qk, gate=gate), ref, atol=1e-6, rtol=1e-5)


def test_linear_is_stable_for_large_logits():
    attn = build_attention("linear", C, 4)
    x, s = _inputs()
    out = attn(x * 1e3, s * 1e3, (6, 5))
    assert torch.isfinite(out).all()


def _twin(name, **kw):
    ref, other = SoftmaxAttention(C, 4).eval(), build_attention(name, C, 4, **kw).eval()
    other.load_state_dict(ref.state_dict(), strict=False)
    return ref, other


def test_strided_stride1_equals_softmax():
    ref, strided = _twin("strided", stride=1)
    x, s = _inputs()
    torch.testing.assert_close(strided(x, s, (6, 5)), ref(x, s, (6, 5)), atol=1e-6, rtol=1e-5)


def test_local_global_full_window_equals_softmax():
    ref, lg = _twin("local_global", window=8, num_global=0)
    x, s = _inputs()
    torch.testing.assert_close(lg(x, s, (6, 5)), ref(x, s, (6, 5)), atol=1e-6, rtol=1e-5)


def test_local_global_windows_with_padding_match_masked_softmax():
    """Window 4 on a 5x7 map (padded tiles): each query sees exactly its tile's valid keys plus the support."""
    ref, lg = _twin("local_global", window=4, num_global=0)
    h, w = 5, 7
    x, s = torch.randn(1, h * w, C), torch.randn(1, 1, 2, C)
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    tile = (rows // 4) * 10 + cols // 4
    mask = torch.cat([tile[:, None] == tile[None, :], torch.ones(h * w, 2, dtype=torch.bool)], 1)
    q, k, v = (ref.heads(p(x)) for p in (ref.q, ref.k, ref.v))
    ks, vs = ref.heads(ref.k(s[0])), ref.heads(ref.v(s[0]))
    o = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([k, ks], -2), torch.cat([v, vs], -2), mask)
    torch.testing.assert_close(lg(x, s, (h, w)), ref.output(o, None), atol=1e-5, rtol=1e-4)


def test_performer_error_shrinks_with_features():
    x, s = _inputs()
    errors = []
    for m in (8, 64, 512):
        err = []
        for seed in range(4):
            ref, perf = _twin("performer", num_features=m, seed=seed)
            perf.redraw(seed)
            err.append((perf(x, s, (6, 5)) - ref(x, s, (6, 5))).abs().mean())
        errors.append(torch.stack(err).mean().item())
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("chunk", [1, 7, 32, 200])
def test_chunked_scan_equals_recurrence(chunk):
    b, t, d, n = 2, 70, 5, 3
    x, dt, bm, cm = torch.randn(b, t, d), torch.rand(b, t, d) * 2, torch.randn(b, t, n), torch.randn(b, t, n)
    a = -torch.rand(d, n) * 4
    torch.testing.assert_close(
        selective_scan(x, dt, a, bm, cm, chunk), selective_scan_reference(x, dt, a, bm, cm), atol=1e-5, rtol=1e-4
    )


def test_ssm_module_fast_equals_reference():
    ssm = build_attention("ssm", C).eval()
    x, s = _inputs()
    torch.testing.assert_close(ssm(x, s, (6, 5)), ssm(x, s, (6, 5), reference=True), atol=1e-5, rtol=1e-4)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown attention 'nope'"):
        build_attention("nope", C)
    with pytest.raises(ValueError, match="not divisible"):
        SoftmaxAttention(10, 4)
    with pytest.raises(ValueError, match="does not match"):
        build_attention("strided", C)(torch.randn(1, 30, C), None, (4, 4))
    assert build_attention("linear", 12, 8).num_heads == 6  # lowered to a divisor
