"""quant_linear: every available backend against the reference (forward, all gradients,
Fisher), the CPU integer path bit-exact against reference.integer_codes, poisoned
outputs and bad input. Triton runs under TRITON_INTERPRET=1 on CPU tensors."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch

import fqkernels as fk
from fqkernels import _ext, reference

EPS = 2.0**-24  # float32 unit roundoff
AVAILABLE = fk.available_backends()


def _backend(name):
    return pytest.param(name, marks=pytest.mark.skipif(name not in AVAILABLE, reason=f"backend {name!r} unavailable"
                                                        + (": no CUDA device" if name == "cuda" else "")))


# (leading dims, K, N, w_bits, a_bits, a_signed, bias): odd sizes from {1, 7, 33, 130, 257},
# every bit-width 2..8 for both operands, both signs, unsigned 8 bit (the shifted codes).
CASES = [
    ((1,), 1, 1, 2, 8, True, True),
    ((7,), 33, 130, 3, 7, False, False),
    ((2, 33), 130, 7, 4, 8, True, True),
    ((3, 7), 257, 33, 5, 8, False, True),
    ((130,), 7, 257, 6, 2, False, False),
    ((1, 1, 7), 33, 7, 7, 3, True, True),
    ((33,), 130, 1, 8, 4, True, False),
    ((7,), 33, 33, 8, 5, False, True),
    ((2, 7), 7, 130, 2, 6, True, True),
    ((257,), 33, 7, 4, None, True, True),  # weight-only quantization
]
TRITON_CASES = [CASES[i] for i in (0, 1, 2, 6, 9)]  # the interpreter is slow: small shapes


def _inputs(lead, K, N, w_bits, a_bits, a_signed, has_bias):
    x = torch.randn(*lead, K) * 2
    if a_bits is not None and not a_signed:
        x = x.abs()  # unsigned activations (ReLU / softmax outputs), a few negative ones masked
        x[..., 0] = -0.3
    weight = torch.randn(N, K) * 0.5
    bias = torch.randn(N) if has_bias else None
    # Scales so that codes fall inside and outside the range at every bit-width.
    w_scale = (torch.rand(N) * 0.5 + 0.2) / 2 ** (w_bits - 2)
    a_scale = torch.tensor([3.0 / 2 ** (a_bits - 1)]) if a_bits else None
    return x, weight, bias, w_scale, a_scale


def _gemm_bound(a, b, k):
    """Elementwise error bound of a float32 product a @ b.T of length k against exact
    arithmetic: (k + 2) unit roundoffs of sum |a_i b_i| (summation order free)."""
    return (k + 2) * EPS * (a.double().abs() @ b.double().abs().t())


def device_for(backend):
    """cuda runs on CUDA tensors; triton too where a GPU is and the interpreter is off."""
    gpu_triton = backend == "triton" and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    return "cuda" if backend == "cuda" or gpu_triton else "cpu"


def _run(backend, args, grad_y, w_bits, a_bits, a_signed):
    dev = device_for(backend)
    # fresh leaves (t.to(dev) on t's own device is t itself): the reference's backward must not
    # accumulate into, and alias, the gradients of the backend it is compared with
    x, weight, bias, w_scale, a_scale = (None if t is None else t.detach().clone().to(dev).requires_grad_()
                                         for t in args)
    y = fk.quant_linear(x, weight, bias, w_scale, a_scale, w_bits, a_bits, a_signed, w_grad_factor=0.7,
                        a_grad_factor=0.3, backend=backend)
    y.backward(grad_y.to(dev))
    outs = (y.detach(), x.grad, weight.grad, None if bias is None else bias.grad, w_scale.grad,
            None if a_scale is None else a_scale.grad)
    return tuple(None if t is None else t.cpu() for t in outs)


def _check_against_reference(backend, case):
    lead, K, N, w_bits, a_bits, a_signed, has_bias = case
    args = _inputs(*case)
    x, weight, bias, w_scale, a_scale = args
    grad_y = torch.randn(*lead, N)
    got = _run(backend, args, grad_y, w_bits, a_bits, a_signed)
    ref = _run("reference", args, grad_y, w_bits, a_bits, a_signed)
    xq = x if a_bits is None else reference.fake_quant_forward(x, a_scale, a_bits, a_signed)
    wq = reference.fake_quant_forward(weight, w_scale, w_bits, True, axis=0)
    x2, g2 = xq.reshape(-1, K), grad_y.reshape(-1, N)
    # Both sides are float32 GEMMs (or the exact integer GEMM) of the same quantized
    # operands: each may be off the exact sum by the float32 GEMM bound, hence twice it.
    # Bias adds one rounding of |y| + |b|.
    bound = 2 * _gemm_bound(x2, wq, K) + 2 * EPS * (ref[0].reshape(-1, N).abs().double() + 1)
    assert ((got[0] - ref[0]).reshape(-1, N).abs().double() <= bound).all()
    # Input and weight gradients: the same masks (identical codes) on GEMMs of length N and T.
    assert ((got[1] - ref[1]).reshape(-1, K).abs().double() <= 2 * _gemm_bound(g2, wq.t(), N)).all()
    assert ((got[2] - ref[2]).abs().double() <= 2 * _gemm_bound(g2.t(), x2.t(), x2.shape[0])).all()
    if has_bias:
        # Column sums of grad_y, T terms in any order.
        torch.testing.assert_close(got[3], ref[3], rtol=0, atol=x2.shape[0] * 4 * EPS * g2.abs().sum(0).max().item())
    # Scale gradients: sums of up to T*K (N*K) float32 terms each carrying the GEMM error
    # of its gradient element: relative 1e-4 of the sum of magnitudes.
    for got_s, ref_s, mags in ((got[4], ref[4], ref[2].abs().sum(1)), (got[5], ref[5], ref[1].abs().sum())):
        if ref_s is not None:
            torch.testing.assert_close(got_s, ref_s, rtol=1e-4, atol=1e-4 * (mags.max().item() + 1))


@pytest.mark.parametrize("backend", [_backend("cpu"), _backend("cuda")])
@pytest.mark.parametrize("case", CASES)
def test_backend_matches_reference(backend, case):
    _check_against_reference(backend, case)


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_reference(case):
    if "triton" not in AVAILABLE:
        pytest.skip("triton is not installed")
    _check_against_reference("triton", case)


# Every bit-width of both operands with both activation signs, on one small odd shape that the
# triton interpreter can afford.
BIT_CASES = [((3,), 7, 5, bits, bits, signed, True) for bits in range(2, 9) for signed in (True, False)]


@pytest.mark.parametrize("backend", [_backend("cpu"), _backend("triton"), _backend("cuda")])
@pytest.mark.parametrize("case", BIT_CASES)
def test_every_bit_width_and_sign_on_a_small_shape(backend, case):
    _check_against_reference(backend, case)


@pytest.mark.skipif("cpu" not in AVAILABLE, reason="fqkernels._cpu not built")
@pytest.mark.parametrize("a_bits,a_signed", [(8, True), (8, False), (5, False), (2, True)])
def test_cpu_integer_path_is_exact(a_bits, a_signed):
    x, weight, _, w_scale, a_scale = _inputs((130,), 257, 33, 4, a_bits, a_signed, False)
    x_codes = torch.full(x.shape, 77, dtype=torch.int8)  # poisoned: every element must be written
    w_codes_t = torch.full((257, 33), 77, dtype=torch.int8)
    row_sums = torch.full((33,), -7, dtype=torch.int32)
    assert not _ext._cpu.quant_act_codes(_ext.dl(x), _ext.dl(a_scale), _ext.dl(x_codes), a_bits, a_signed)
    assert not _ext._cpu.quant_weight_codes_t(_ext.dl(weight), _ext.dl(w_scale), _ext.dl(w_codes_t),
                                              _ext.dl(row_sums), 4)
    ref_x = reference.integer_codes(x, a_scale, a_bits, a_signed)
    ref_w = reference.integer_codes(weight, w_scale, 4, True, axis=0)
    offset = 128 if (a_bits == 8 and not a_signed) else 0  # unsigned 8-bit codes are stored shifted
    assert torch.equal(x_codes.int() + offset, ref_x)
    assert torch.equal(w_codes_t.t().int(), ref_w)
    assert torch.equal(row_sums, ref_w.sum(1).int())
    # The int32 accumulator plus the row-sum correction is the exact integer product.
    acc = torch._int_mm(x_codes, w_codes_t).long() + offset * row_sums.long()
    assert torch.equal(acc, ref_x.long() @ ref_w.long().t())
    # The epilogue rounds (exact sum) * a_scale * w_scale once (in double, then to float):
    # within 1 ulp of the exact value.
    y = fk.quant_linear(x, weight, None, w_scale, a_scale, 4, a_bits, a_signed, backend="cpu")
    exact = acc.double() * a_scale.double() * w_scale.double()
    assert ((y.double() - exact).abs() <= exact.abs() * 2 * EPS + 1e-45).all()


@pytest.mark.parametrize("backend", [_backend("cpu"), _backend("triton"), _backend("cuda")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    """bf16 / fp16 inputs are quantized and multiplied in float32 and the results rounded
    to the input dtype once: within 2 of its unit roundoffs (2^-8 bf16, 2^-11 fp16) of the
    largest entry of the float32 computation on the same (upcast) inputs."""
    args = _inputs((3, 7), 33, 130, 4, 8, True, True)
    x, weight = (t.to(dtype) for t in args[:2])
    grad_y = torch.randn(3, 7, 130).to(dtype)
    fresh = lambda: [t.clone() for t in args[2:]]  # noqa: E731 - _run turns its inputs into leaves
    full = _run("reference", (x.float(), weight.float(), *fresh()), grad_y.float(), 4, 8, True)
    half = _run(backend, (x, weight, *fresh()), grad_y, 4, 8, True)
    unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert half[0].dtype == dtype and half[1].dtype == dtype and half[2].dtype == dtype
    for got, want in zip(half[:3], full[:3]):  # y, grad_x, grad_weight
        assert (got.float() - want).abs().max() <= 2 * unit * want.abs().max()
    for got, want in zip(half[4:], full[4:]):  # scale gradients: float32 sums
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("backend", [_backend("cpu"), _backend("triton"), _backend("cuda")])
def test_nan_operands_on_the_integer_path(backend):
    """W4A8 signed takes the exact int8 path, whose codes cannot hold NaN: a NaN activation
    must still poison its output row and a NaN weight its column, as in the reference."""
    x, weight, bias, w_scale, a_scale = _inputs((7,), 33, 5, 4, 8, True, True)
    x[3, 4], weight[2, 7] = float("nan"), float("nan")
    dev = device_for(backend)
    y = fk.quant_linear(*(t.to(dev) for t in (x, weight, bias, w_scale, a_scale)), 4, 8, backend=backend).cpu()
    ref = fk.quant_linear(x, weight, bias, w_scale, a_scale, 4, 8, backend="reference")
    assert torch.equal(y.isnan(), ref.isnan()) and y[3].isnan().all() and y[:, 2].isnan().all()
    assert torch.isfinite(y[[0, 1, 2, 4, 5, 6]][:, [0, 1, 3, 4]]).all()


@pytest.mark.parametrize("backend", [_backend("cpu"), _backend("triton"), _backend("cuda")])
def test_outputs_are_poisoned_before_kernels(backend, monkeypatch):
    """Every buffer the glue allocates starts as NaN (or a sentinel integer): an element a
    kernel forgets to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else 77)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    _check_against_reference(backend, CASES[2])


@pytest.mark.parametrize("backend", [_backend("cpu"), _backend("triton")])
@pytest.mark.parametrize("batch_dim", [0, 1])
def test_fisher_accumulates_like_reference(backend, batch_dim):
    if device_for(backend) != "cpu":
        pytest.skip("this test feeds CPU tensors (the Fisher hook is shared by all backends)")
    args = _inputs((3, 5), 7, 6, 4, 8, True, True)
    grad_y = torch.randn(3, 5, 6)
    fishers = [torch.full((6, 7), 0.5) for _ in range(2)]
    for be, f in zip((backend, "reference"), fishers):
        x, weight, bias, w_scale, a_scale = (t.clone().requires_grad_() for t in args)
        fk.quant_linear(x, weight, bias, w_scale, a_scale, 4, 8, fisher=f, fisher_batch_dim=batch_dim,
                        backend=be).backward(grad_y)
    # Same per-sample products of the same quantized operands; squares of sums of 5 terms.
    torch.testing.assert_close(fishers[0], fishers[1], rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_named_errors():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="x: expected last dimension"):
        fk.quant_linear(torch.randn(4, 7), w, w_scale=0.1, a_scale=0.1)
    with pytest.raises(ValueError, match="w_bits"):
        fk.quant_linear(x, w, w_scale=0.1, a_scale=0.1, w_bits=9)
    with pytest.raises(ValueError, match="bias"):
        fk.quant_linear(x, w, torch.randn(4), w_scale=0.1, a_scale=0.1)
    with pytest.raises(ValueError, match="w_scale"):
        fk.quant_linear(x, w, w_scale=torch.tensor([0.1, -1.0, 0.1]), a_scale=0.1)
    with pytest.raises(TypeError, match="x"):
        fk.quant_linear(x.int(), w, w_scale=0.1, a_scale=0.1)


@pytest.mark.skipif("cpu" not in AVAILABLE, reason="fqkernels._cpu not built")
def test_cpu_bindings_check_arguments():
    x, s = torch.randn(4, 8), torch.tensor([0.1])
    with pytest.raises(TypeError, match="codes: expected dtype int8"):
        _ext._cpu.quant_act_codes(_ext.dl(x), _ext.dl(s), _ext.dl(torch.empty(4, 8)), 8, True)
    with pytest.raises(ValueError, match="codes_t: expected shape"):
        _ext._cpu.quant_weight_codes_t(_ext.dl(x), _ext.dl(torch.ones(4)), _ext.dl(torch.empty(4, 8, dtype=torch.int8)),
                                       _ext.dl(torch.empty(4, dtype=torch.int32)), 4)
    with pytest.raises(ValueError, match="a_bits"):
        _ext._cpu.int_accum_epilogue(_ext.dl(torch.zeros(2, 3, dtype=torch.int32)), _ext.dl(s), _ext.dl(torch.ones(3)),
                                     _ext.dl(torch.zeros(3, dtype=torch.int32)), None, 1, True)


# ------------------------------------------------- inputs at the edges of what the reference accepts
EDGE_BACKENDS = [_backend("cpu"), _backend("triton"), _backend("cuda")]


def _grads_of(fn, backend, tensors):
    dev = device_for(backend)
    # fresh leaves: t.to(dev) on t's own device is t itself, whose .grad a second call would
    # accumulate into (and the two calls' results would alias one tensor)
    leaves = [t.detach().clone().to(dev).requires_grad_() for t in tensors]
    y = fn(*leaves, backend=backend)
    y.backward(torch.arange(y.numel(), dtype=y.dtype, device=dev).reshape(y.shape) % 3 - 1)
    return [y.detach().cpu()] + [None if t.grad is None else t.grad.cpu() for t in leaves]


def _assert_same_as_reference(fn, backend, tensors, atol=1e-5):
    """Output and every gradient of ``backend`` against the reference's. The same codes and
    scales, fp32 sums in another order over K <= 6 terms: ~1e-6 relative, bounded by 1e-5."""
    got, want = _grads_of(fn, backend, tensors), _grads_of(fn, "reference", tensors)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("rows,K,M", [(3, 0, 4), (3, 5, 0), (0, 5, 4)])
@pytest.mark.parametrize("a_bits", [8, None])
def test_quant_linear_empty_dimensions(backend, rows, K, M, a_bits):
    def fn(x, w, b, ws, a_s, backend):
        return fk.quant_linear(x, w, b, ws, a_s if a_bits else None, 4, a_bits, backend=backend)
    tensors = [torch.randn(2, rows, K), torch.randn(M, K), torch.randn(M), torch.rand(M) + 0.1, torch.tensor([0.1])]
    _assert_same_as_reference(fn, backend, tensors)
    if K == 0 and M:  # an empty sum: the output is the bias
        y = _grads_of(fn, backend, tensors)[0]
        assert torch.equal(y, tensors[2].expand(2, rows, M))


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("M,K,N", [(3, 0, 4), (3, 5, 0), (0, 5, 4)])
def test_quant_matmul_empty_dimensions(backend, M, K, N):
    def fn(a, b, sa, sb, backend):
        return fk.quant_matmul(a, b, sa, sb, 8, 4, backend=backend)
    _assert_same_as_reference(fn, backend, [torch.randn(2, M, K), torch.randn(2, K, N), torch.tensor([0.1]),
                                            torch.tensor([0.2])])


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("a_bits", [8, None])
def test_weight_scales_as_a_column(backend, a_bits):
    """[M, 1] weight scales (what a per-row amax keepdim gives): the gradient keeps that shape."""
    def fn(x, w, ws, backend):
        return fk.quant_linear(x, w, None, ws, 0.05, 4, a_bits, backend=backend)
    _assert_same_as_reference(fn, backend, [torch.randn(3, 6), torch.randn(5, 6), torch.rand(5, 1) * 0.2 + 0.05])


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
def test_subnormal_scales_agree_with_reference(backend):
    """Scales whose reciprocal overflows (fake_quant's test_subnormal_scale_keeps_zero_at_code_zero):
    zeros in x and W stay code 0 on the integer path too, and nothing turns NaN."""
    def fn(x, w, ws, a_s, backend):
        return fk.quant_linear(x, w, None, ws, a_s, 4, 8, backend=backend)
    x, w = torch.randn(3, 6), torch.randn(5, 6)
    x[:, ::2], w[::2] = 0.0, 0.0
    tensors = [x, w, torch.full((5,), 1e-40), torch.tensor([1e-41])]
    # outputs and gradients are subnormal (~1e-39): only a relative bound says anything there
    _assert_same_as_reference(fn, backend, tensors, atol=0)
    results = _grads_of(fn, backend, tensors)
    assert not any(t.isnan().any() for t in results)
    y, grad_x, grad_w = results[:3]
    assert torch.equal(y, torch.zeros(3, 5))  # code x code x 1e-40 x 1e-41 underflows to 0
    assert grad_x.abs().max() > 0 and grad_w.abs().max() > 0  # the gradients did not underflow


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every op dispatched while active (a dispatch mode, as fake tensors
    and make_fx use)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif("cpu" not in AVAILABLE, reason="fqkernels._cpu is not built")
def test_eager_calls_skip_the_custom_ops_and_modes_see_them(monkeypatch):
    import sys
    module = sys.modules["fqkernels.quant_linear"]
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(8, 16))
    s_w, s_a = torch.full((8,), 0.05), torch.tensor([0.02])
    expected = fk.quant_linear(x, w, None, s_w, s_a, backend="cpu")
    with _RecordOps() as mode:  # a dispatch mode must see the op (it cannot see a C++ call)
        assert torch.equal(fk.quant_linear(x, w, None, s_w, s_a, backend="cpu"), expected)
    assert "fqkernels.quant_linear_forward.default" in mode.names
    with torch.profiler.profile() as prof:  # profiles name the op also when it is bypassed
        fk.quant_linear(x, w, None, s_w, s_a, backend="cpu").sum().backward()
    assert {"fqkernels::quant_linear_forward", "fqkernels::quant_linear_backward"} <= {
        e.key for e in prof.key_averages()}

    def fail(*args):
        raise AssertionError("an eager call went through the custom op")

    monkeypatch.setattr(module, "quant_linear_forward_op", fail)
    monkeypatch.setattr(module, "quant_linear_backward_op", fail)
    y = fk.quant_linear(x, w, None, s_w, s_a, backend="cpu")  # Parameters are plain tensors here
    assert torch.equal(y, expected)
    y.sum().backward()
