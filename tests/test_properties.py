"""Property-based tests (hypothesis): the compiled CPU backend against the pure-PyTorch
reference on random shapes (1 and odd sizes included), every bit-width 2..8, signed and
unsigned, per tensor and per channel, contiguous or not; per_sample_fisher against a
float64 loop over samples. Inputs come from a drawn seed so a failure replays exactly."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fqkernels as fk
from fqkernels import reference

EPS = 2.0**-24  # float32 unit roundoff
DOUBLE_EPS = 2.0**-53  # float64 unit roundoff
pytestmark = pytest.mark.skipif("cpu" not in fk.available_backends(), reason="fqkernels._cpu not built")
# Examples per test and their randomness come from the hypothesis profile (tests/conftest.py).
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

dims = st.integers(1, 37)
bits = st.integers(2, 8)
seeds = st.integers(0, 2**31 - 1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _maybe_strided(x, strided):
    """The same values as ``x`` in a new tensor, non-contiguous if ``strided`` (every other column
    of a wider one): a fresh leaf per call, so two backends' gradients never accumulate into one."""
    if not strided:
        return x.clone()
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    wide[..., 1::2] = float("nan")  # never read
    view = wide[..., ::2]
    assert x.shape[-1] == 1 or not view.is_contiguous()
    return view


@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=3), b=bits, signed=st.booleans(), per_channel=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), strided=st.booleans(), seed=seeds,
       grad_factor=st.floats(0.01, 2.0))
def test_fake_quant_cpu_equals_reference(shape, b, signed, per_channel, dtype, strided, seed, grad_factor):
    g = _gen(seed)
    axis = (seed % len(shape)) if per_channel else None
    channels = shape[axis] if per_channel else 1
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    # Scales spread over 1/2^b .. 1, so codes fall inside and outside the range.
    scale = (torch.rand(channels, generator=g) + 2.0**-b).clamp(max=1.0)
    grad_y = torch.randn(*shape, generator=g).to(dtype)
    outs = {}
    for backend in ("reference", "cpu"):
        xb = _maybe_strided(x, strided).requires_grad_()
        sb = scale.clone().requires_grad_()
        y = fk.fake_quant(xb, sb, b, signed, axis, grad_factor=grad_factor, backend=backend)
        y.backward(grad_y)
        outs[backend] = (y.detach(), xb.grad, sb.grad)
    (yr, gxr, gsr), (yc, gxc, gsc) = outs["reference"], outs["cpu"]
    # Forward and input gradient: the same float32 formula elementwise (x * (1/s), round half
    # to even, clamp, times s; STE mask from the same codes), rounded once to the dtype: exact.
    assert torch.equal(yc, yr)
    assert torch.equal(gxc, gxr)
    # Scale gradient: per channel a sum of n terms g * ds * grad_factor, |ds| <= max(|qmin|, qmax),
    # added in different orders (and precisions). Two float32 sums of the same n terms differ by
    # at most 2 (n - 1) eps sum|term| (plus one rounding each for the factor).
    qmin, qmax = reference.qrange(b, signed)
    dims_ = [d for d in range(len(shape)) if d != axis] if per_channel else list(range(len(shape)))
    mag = grad_y.float().abs()
    mag = (mag.sum(dim=dims_) if dims_ else mag).reshape(-1) * max(-qmin, qmax) * grad_factor
    n = x.numel() // channels
    bound = 2 * (n + 2) * EPS * mag + 1e-30
    assert ((gsc - gsr).abs() <= bound).all(), ((gsc - gsr).abs() / bound).max()


def _gemm_bound(a, b, k):
    """Elementwise bound of a float32 a @ b.T of length k against exact arithmetic."""
    return (k + 2) * EPS * (a.double().abs() @ b.double().abs().t())


@SETTINGS
@given(lead=st.lists(dims, min_size=1, max_size=2), k=dims, m=dims, w_bits=bits,
       a_bits=st.one_of(st.none(), bits), a_signed=st.booleans(), has_bias=st.booleans(), strided=st.booleans(),
       seed=seeds)
def test_quant_linear_cpu_close_to_reference(lead, k, m, w_bits, a_bits, a_signed, has_bias, strided, seed):
    g = _gen(seed)
    x = torch.randn(*lead, k, generator=g) * 2
    if a_bits is not None and not a_signed:
        x = x.abs() - 0.1  # mostly non-negative, a few negatives clamped to 0
    weight = torch.randn(m, k, generator=g) * 0.5
    bias = torch.randn(m, generator=g) if has_bias else None
    w_scale = (torch.rand(m, generator=g) * 0.5 + 0.2) / 2 ** (w_bits - 2)
    a_scale = torch.tensor([3.0 / 2 ** (a_bits - 1)]) if a_bits else None
    grad_y = torch.randn(*lead, m, generator=g)
    res = {}
    for backend in ("reference", "cpu"):
        xb = _maybe_strided(x, strided).requires_grad_()
        wb, ws = weight.clone().requires_grad_(), w_scale.clone().requires_grad_()
        bb = None if bias is None else bias.clone().requires_grad_()
        ab = None if a_scale is None else a_scale.clone().requires_grad_()
        y = fk.quant_linear(xb, wb, bb, ws, ab, w_bits, a_bits, a_signed, w_grad_factor=0.7, a_grad_factor=0.3,
                            backend=backend)
        y.backward(grad_y)
        res[backend] = (y.detach(), xb.grad, wb.grad, None if bb is None else bb.grad, ws.grad,
                        None if ab is None else ab.grad)
    ref, got = res["reference"], res["cpu"]
    xq = x if a_bits is None else reference.fake_quant_forward(x, a_scale, a_bits, a_signed)
    wq = reference.fake_quant_forward(weight, w_scale, w_bits, True, axis=0)
    x2, g2 = xq.reshape(-1, k), grad_y.reshape(-1, m)
    rows = x2.shape[0]
    # Forward: both are GEMMs of the same quantized operands (the cpu one exact in integers and
    # rounded once, the reference a float32 GEMM): each within the float32 GEMM bound of the
    # exact product, hence twice it; the bias adds one rounding of |y| + |b|.
    bound = 2 * _gemm_bound(x2, wq, k) + 2 * EPS * (ref[0].reshape(-1, m).abs().double() + 1)
    assert ((got[0] - ref[0]).reshape(-1, m).abs().double() <= bound).all()
    # dx and dW: the same STE masks (identical codes) on float32 GEMMs of length m and rows.
    assert ((got[1] - ref[1]).reshape(-1, k).abs().double() <= 2 * _gemm_bound(g2, wq.t(), m)).all()
    assert ((got[2] - ref[2]).abs().double() <= 2 * _gemm_bound(g2.t(), x2.t(), rows)).all()
    if has_bias:  # column sums of grad_y: rows terms in any order
        assert ((got[3] - ref[3]).abs() <= 2 * (rows + 1) * EPS * g2.abs().sum(0)).all()
    # Scale gradients: sums of up to rows*k (m*k) terms, each carrying the GEMM error of its
    # gradient element: relative 1e-4 of the sum of magnitudes.
    for got_s, ref_s, mags in ((got[4], ref[4], ref[2].abs().sum(1)), (got[5], ref[5], ref[1].abs().sum())):
        if ref_s is not None:
            torch.testing.assert_close(got_s, ref_s, rtol=1e-4, atol=1e-4 * (mags.max().item() + 1))


def _fisher_oracle(x, grad_out, batch_dim):
    """float64 loop over samples: per-sample gradients G_n, and A_n = |D_n|^T |X_n| (the sum
    of magnitudes that bounds the float32 rounding of G_n)."""
    xs, ds = reference._samples(x, grad_out, batch_dim)
    gs = torch.stack([dn.double().t() @ xn.double() for xn, dn in zip(xs, ds)])
    mags = torch.stack([dn.double().abs().t() @ xn.double().abs() for xn, dn in zip(xs, ds)])
    return gs, mags


@SETTINGS
@given(n=dims, t=st.integers(1, 9), k=dims, m=dims, layout=st.sampled_from(["NK", "NTK", "TNK"]),
       strided=st.booleans(), seed=seeds)
def test_per_sample_fisher_cpu_and_reference_against_loop(n, t, k, m, layout, strided, seed):
    g = _gen(seed)
    shape = {"NK": (n,), "NTK": (n, t), "TNK": (t, n)}[layout]
    batch_dim = 1 if layout == "TNK" else 0
    x = _maybe_strided(torch.randn(*shape, k, generator=g), strided)
    d = torch.randn(*shape, m, generator=g)
    gs, mags = _fisher_oracle(x, d, batch_dim)
    exact, exact_norms = gs.square().sum(0), gs.square().sum((1, 2))
    tt = 1 if layout == "NK" else t
    # float32: each G_n element is off by at most (T + 1) eps A_n, so its square by about
    # 2 (T + 1) eps A_n^2; squaring and summing N (or M*K) terms add (N + 2) eps sum A_n^2.
    bound = (2 * tt + n + 6) * EPS * mags.square().sum(0) + 1e-30
    norm_bound = (2 * tt + m * k + 6) * EPS * mags.square().sum((1, 2)) + 1e-30
    for backend in ("reference", "cpu"):
        f = fk.per_sample_fisher(x, d, batch_dim=batch_dim, backend=backend)
        assert f.shape == (m, k) and f.dtype == torch.float32
        assert ((f.double() - exact).abs() <= bound).all(), backend
        sq = fk.per_sample_sq_norms(x, d, batch_dim=batch_dim, backend=backend)
        assert sq.shape == (n,)
        assert ((sq.double() - exact_norms).abs() <= norm_bound).all(), backend
        # float64 accumulation into an existing buffer adds, and is (nearly) exact. The offset
        # costs two float64 roundings of |0.25 + F| (adding into the buffer, subtracting 0.25
        # here), which the float32 bound does not cover where A_n is near 0 (an input near 0:
        # F ~ 1e-20, bound ~ 1e-27, rounding of 0.25 ~ 3e-17; found by a run of this test).
        out = torch.full((m, k), 0.25, dtype=torch.float64)
        fk.per_sample_fisher(x, d, batch_dim=batch_dim, out=out, backend=backend)
        offset_rounding = 2 * DOUBLE_EPS * (0.25 + exact)
        assert ((out - 0.25 - exact).abs() <= bound + offset_rounding).all(), backend


@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=3), b=bits, signed=st.booleans(), seed=seeds)
def test_fake_quant_codes_in_range_and_idempotent(shape, b, signed, seed):
    """Backend-independent properties: outputs are integer multiples of the scale within
    [qmin, qmax], quantizing twice changes nothing, and |y - x| <= s/2 where not clamped."""
    g = _gen(seed)
    x = torch.randn(*shape, generator=g) * 2
    s = float(torch.rand(1, generator=g)) * 0.5 + 0.01
    y = fk.fake_quant(x, s, b, signed, backend="cpu")
    qmin, qmax = reference.qrange(b, signed)
    codes = y / s
    assert torch.isfinite(y).all()
    assert ((codes.round() - codes).abs() <= 1e-4 * (codes.abs() + 1)).all()
    assert (codes.round() >= qmin).all() and (codes.round() <= qmax).all()
    assert torch.equal(fk.fake_quant(y, s, b, signed, backend="cpu"), y)
    inside = reference.ste_mask(x, torch.tensor([s]), b, signed)
    assert ((y - x).abs()[inside] <= s / 2 * (1 + 1e-6) + 1e-7).all()
