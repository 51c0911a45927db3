"""fake_quant: reference against torch's fake-quant ops, compiled CPU kernel against
the reference, registry behaviour and bad input."""
import pytest
import torch
from torch.utils.dlpack import to_dlpack

import fqkernels as fk
from fqkernels import _ext, reference

ALL_BITS = range(2, 9)
HAS_CPU = "cpu" in fk.available_backends()
# The compiled backends and the device their tensors live on (cuda: run by benchmarks/gpu_check.sh).
COMPILED = [pytest.param("cpu", "cpu", marks=pytest.mark.skipif(not HAS_CPU, reason="fqkernels._cpu is not built")),
            pytest.param("cuda", "cuda", marks=pytest.mark.skipif("cuda" not in fk.available_backends(),
                                                                  reason="no CUDA device or fqkernels._cuda"))]
ODD_SHAPES = [(1,), (7,), (33, 5), (3, 130), (2, 7, 33), (257, 1)]


def _scales(channels):
    # Scales spread so that codes fall inside and outside the range at every bit-width.
    return torch.rand(channels) * 0.5 + 0.05


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_reference_matches_torch_learnable_per_channel(bits, signed):
    qmin, qmax = reference.qrange(bits, signed)
    x = torch.randn(7, 33) * 2
    s = _scales(7)
    y = reference.fake_quant_forward(x, s, bits, signed, axis=0)
    xt, st = x.clone().requires_grad_(), s.clone().requires_grad_()
    yt = torch._fake_quantize_learnable_per_channel_affine(xt, st, torch.zeros(7), 0, qmin, qmax, 1.0)
    expected = torch.fake_quantize_per_channel_affine(x, s, torch.zeros(7, dtype=torch.int32), 0, qmin, qmax)
    # Same formula (x * (1/s), round half even, clamp, times s) in float32: bit-identical.
    assert torch.equal(y, expected)
    assert torch.equal(y, yt.detach())
    g = torch.randn_like(x)
    yt.backward(g)
    gx, gs = reference.fake_quant_backward(g, x, s, bits, signed, axis=0)
    assert torch.equal(gx, xt.grad)
    # Scale gradients are sums of 33 float32 terms in different orders: a few ulps of
    # the largest partial sum.
    torch.testing.assert_close(gs, st.grad, rtol=1e-5, atol=1e-5 * (g.abs().sum() / 7).item())


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_reference_matches_torch_per_tensor(bits, signed):
    qmin, qmax = reference.qrange(bits, signed)
    x = torch.randn(5, 9, 4)
    s = torch.tensor([0.07])
    xt, st = x.clone().requires_grad_(), s.clone().requires_grad_()
    yt = torch._fake_quantize_learnable_per_tensor_affine(xt, st, torch.zeros(1), qmin, qmax, 0.5)
    g = torch.randn_like(x)
    yt.backward(g)
    assert torch.equal(reference.fake_quant_forward(x, s, bits, signed), yt.detach())
    gx, gs = reference.fake_quant_backward(g, x, s, bits, signed, grad_factor=0.5)
    assert torch.equal(gx, xt.grad)
    # 180 float32 terms summed in different orders.
    torch.testing.assert_close(gs, st.grad, rtol=1e-5, atol=1e-5 * g.abs().sum().item())


def test_round_half_to_even_at_ties():
    s = torch.tensor([1.0])
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert reference.fake_quant_forward(x, s, 8, True).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0]
    if HAS_CPU:
        assert fk.fake_quant(x, s, bits=8, backend="cpu").tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0]


def _compare_backend(backend, x, scale, bits, signed, axis):
    xr = x.detach().clone().requires_grad_()
    sr = scale.detach().clone().requires_grad_()
    xc = x.detach().clone().requires_grad_()
    sc = scale.detach().clone().requires_grad_()
    g = torch.randn(x.shape).to(x.dtype).to(x.device)
    yr = fk.fake_quant(xr, sr, bits, signed, axis, grad_factor=0.3, backend="reference")
    yc = fk.fake_quant(xc, sc, bits, signed, axis, grad_factor=0.3, backend=backend)
    # Forward and input gradient: the same float32 formula elementwise, so bit-identical
    # (also in bfloat16: both round the float32 result to nearest even).
    assert torch.equal(yc, yr)
    yr.backward(g)
    yc.backward(g)
    assert torch.equal(xc.grad, xr.grad)
    # Scale gradient: the kernel sums per chunk in float32 and across chunks in float64,
    # the reference with torch.sum in float32; differences are rounding of the sum,
    # bounded by a few ulps of sum |term| (terms are |g| * at most qmax).
    qmax = reference.qrange(bits, signed)[1]
    bound = 1e-5 * g.float().abs().sum().item() * max(qmax, 1) / scale.numel()
    torch.testing.assert_close(sc.grad, sr.grad, rtol=1e-5, atol=bound)


@pytest.mark.parametrize("backend, device", COMPILED)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_backend_matches_reference(backend, device, bits, signed, dtype):
    """Per tensor, per channel along the last and the first axis, on odd shapes; the reference
    runs on the same device."""
    for shape in ODD_SHAPES:
        x = (torch.randn(shape) * 3).to(dtype).to(device)
        _compare_backend(backend, x, torch.tensor([0.2], device=device), bits, signed, None)
        axis = len(shape) - 1 if len(shape) > 1 else 0
        _compare_backend(backend, x, _scales(shape[axis]).to(device), bits, signed, axis)
        _compare_backend(backend, x, _scales(shape[0]).to(device), bits, signed, 0)


@pytest.mark.skipif(not HAS_CPU, reason="fqkernels._cpu is not built")
def test_cpu_large_multi_chunk_and_non_contiguous():
    # More elements than one OpenMP chunk (16k), per channel along a middle axis,
    # and a transposed (non-contiguous) input.
    x = torch.randn(40, 33, 70).transpose(0, 2)
    assert not x.is_contiguous()
    _compare_backend("cpu", x, _scales(33), 4, True, 1)
    _compare_backend("cpu", x, torch.tensor([0.1]), 3, False, None)


@pytest.mark.skipif(not HAS_CPU, reason="fqkernels._cpu is not built")
def test_cpu_writes_every_output_element():
    x = torch.randn(33, 130)
    s = _scales(33)
    out = torch.full_like(x, float("nan"))
    _ext._cpu.fake_quant_forward(to_dlpack(x), to_dlpack(s), to_dlpack(out), 5, True, 0)
    assert torch.equal(out, reference.fake_quant_forward(x, s, 5, True, axis=0))
    gx, gs = torch.full_like(x, float("nan")), torch.full_like(s, float("nan"))
    g = torch.randn_like(x)
    _ext._cpu.fake_quant_backward(to_dlpack(g), to_dlpack(x), to_dlpack(s), to_dlpack(gx), to_dlpack(gs), 5,
                                  True, 0, 1.0)
    assert not gx.isnan().any() and not gs.isnan().any()


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if HAS_CPU else []))
def test_nan_and_inf_inputs_documented_behaviour(backend):
    # NaN inputs stay NaN (never silently become a code) and pass no gradient;
    # +-inf saturate to the range ends.
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3], requires_grad=True)
    y = fk.fake_quant(x, 0.1, bits=4, backend=backend)
    assert y[0].isnan() and y[1].item() == pytest.approx(0.7) and y[2].item() == pytest.approx(-0.8)
    y[1:].sum().backward()
    assert x.grad.tolist()[:3] == [0.0, 0.0, 0.0]


def test_lsq_grad_factor():
    assert fk.lsq_grad_factor(100, 4, True) == pytest.approx(1 / (100 * 7) ** 0.5)
    assert fk.lsq_grad_factor(10, 8, False) == pytest.approx(1 / (10 * 255) ** 0.5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"bits": 9}, ValueError, "bits"),
        ({"bits": 1}, ValueError, "bits"),
        ({"bits": 4.0}, TypeError, "bits"),
        ({"scale": torch.tensor([0.0])}, ValueError, "scale"),
        ({"scale": torch.tensor([-1.0])}, ValueError, "scale"),
        ({"scale": torch.tensor([float("nan")])}, ValueError, "scale"),
        ({"scale": float("inf")}, ValueError, "scale"),
        ({"scale": torch.ones(3)}, ValueError, "scale"),
        ({"scale": torch.ones(4), "axis": 0}, ValueError, "scale"),
        ({"axis": 5}, ValueError, "axis"),
        ({"x": torch.ones(5, 7, dtype=torch.int32)}, TypeError, "x"),
        ({"x": [1.0, 2.0]}, TypeError, "x"),
        ({"scale": torch.ones(1, dtype=torch.int64)}, TypeError, "scale"),
        ({"scale": torch.ones(1, device="meta")}, ValueError, "scale"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = {"x": torch.randn(5, 7), "scale": torch.tensor([0.1]), "bits": 4}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fk.fake_quant(**args)


@pytest.mark.skipif(not HAS_CPU, reason="fqkernels._cpu is not built")
def test_compiled_module_checks_its_inputs():
    x, s = torch.randn(4, 5), torch.rand(4) + 0.1
    with pytest.raises(ValueError, match="out: expected shape"):
        _ext._cpu.fake_quant_forward(to_dlpack(x), to_dlpack(s), to_dlpack(torch.empty(3)), 4, True, 0)
    with pytest.raises(TypeError, match="out: expected the dtype"):
        _ext._cpu.fake_quant_forward(to_dlpack(x), to_dlpack(s), to_dlpack(torch.empty(4, 5).bfloat16()), 4,
                                     True, 0)
    with pytest.raises(ValueError, match="x: expected a contiguous"):
        _ext._cpu.fake_quant_forward(to_dlpack(x.t()), to_dlpack(s), to_dlpack(torch.empty(5, 4)), 4, True, 1)
    with pytest.raises(TypeError, match="DLPack"):
        _ext._cpu.fake_quant_forward(x, to_dlpack(s), to_dlpack(x), 4, True, 0)


def test_registry_choice_and_forcing(monkeypatch):
    x = torch.randn(3)
    assert fk.backend_for("fake_quant", x) == ("cpu" if HAS_CPU else "reference")
    monkeypatch.setenv("FQ_BACKEND", "reference")
    assert fk.backend_for("fake_quant", x) == "reference"
    monkeypatch.setenv("FQ_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda.*unavailable"):
        fk.fake_quant(x, 0.1)
    monkeypatch.setenv("FQ_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        fk.fake_quant(x, 0.1)


def test_custom_ops_pass_opcheck():
    # Schema, fake (meta) implementation and autograd registration are consistent.
    from fqkernels.fake_quant import fake_quant_backward_op, fake_quant_forward_op

    x, s = torch.randn(6, 5), torch.rand(6) + 0.1
    backend = fk.backend_for("fake_quant", x)
    torch.library.opcheck(fake_quant_forward_op, (x, s, 4, True, 0, backend))
    torch.library.opcheck(fake_quant_backward_op, (torch.randn(6, 5), x, s, 4, True, 0, 1.0, backend))


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if HAS_CPU else []))
@pytest.mark.parametrize("scale", [1e-40, 1e-45, 5e-39])
def test_subnormal_scale_keeps_zero_at_code_zero(backend, scale):
    """1 / scale overflows to inf below 2^-128; 0 * inf must not make a NaN code: 0 stays 0
    (as it is at every scale), other values saturate or round as usual, no NaN anywhere."""
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, 3 * scale, -2e-39], requires_grad=True)
    s = torch.tensor([scale], requires_grad=True)
    y = fk.fake_quant(x, s, bits=8, backend=backend)
    y.backward(torch.ones_like(y))
    assert y[0].item() == 0 and y[1].item() == 0
    assert not y.isnan().any() and not x.grad.isnan().any() and not s.grad.isnan().any()
    qmax_value = torch.tensor(127.0) * torch.tensor(scale)
    assert y[2] == qmax_value  # saturated, as torch's fake quant saturates it
    if backend != "reference":
        ref_x, ref_s = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
        ref_y = fk.fake_quant(ref_x, ref_s, bits=8, backend="reference")
        ref_y.backward(torch.ones_like(ref_y))
        assert torch.equal(y, ref_y) and torch.equal(x.grad, ref_x.grad)
        torch.testing.assert_close(s.grad, ref_s.grad)
