"""per_sample_fisher / per_sample_sq_norms / conv2d_per_sample_fisher: every backend
against the reference and against a torch.func vmap(grad) oracle in float64, on odd
shapes, both layouts, T = 1, Conv2d with stride/padding/dilation/groups; accumulation;
poisoned outputs; bad inputs. Triton runs under TRITON_INTERPRET=1 on CPU tensors."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch
from torch.func import functional_call, grad, vmap

import fqkernels as fk
from fqkernels import _ext, backends, reference
from fqkernels import fisher as fisher_ops

AVAILABLE = backends.available_backends()
HAS_GPU = torch.cuda.is_available()


def _param(name):
    if name == "cuda":
        return pytest.param(name, marks=pytest.mark.skipif(not HAS_GPU or "cuda" not in AVAILABLE,
                                                           reason="needs a CUDA GPU and fqkernels._cuda"))
    return pytest.param(name, marks=pytest.mark.skipif(name not in AVAILABLE, reason=f"backend {name} unavailable"))


BACKENDS = [_param(b) for b in ("reference", "cpu", "triton", "cuda")]
# cuda runs on CUDA tensors; triton too where a GPU is and the interpreter is off.
DEVICE = {"cuda": "cuda", **({"triton": "cuda"} if HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1" else {})}

# Tolerance: relative to the largest entry, 1e-5. Each per-sample gradient entry is an
# fp32 dot product of T terms accumulated in fp32 (blocked, FMA): its error is at most
# ~T*u*sum_t|D_tm X_tk| in the worst case and ~sqrt(T)*u in practice (u = 6e-8), so
# ~7e-7 for T <= 130; squaring doubles the relative error, and the sum over N samples of
# non-negative terms adds ~N*u. The oracles run in float64 on the same fp32 inputs, so
# everything measured is the kernels' own rounding, an order below the bound.
RTOL = 1e-5

# (N, T, K, M): T = 1, single features, odd and non-power-of-two sizes, a block edge (130).
SHAPES = [(1, 1, 1, 1), (3, 7, 33, 130), (4, 1, 130, 7), (2, 33, 7, 1), (5, 130, 33, 33)]


def rel_err(a, b):
    return ((a.double().cpu() - b.double().cpu()).abs().max() / b.double().cpu().abs().max().clamp_min(1e-300)).item()


def linear_oracle(x, grad_out):
    """Per-sample weight gradients of y = x W^T for the per-sample-summed loss
    sum_n <y_n, grad_out_n>, by torch.func vmap(grad) in float64: x [N, T, K]."""
    lin = torch.nn.Linear(x.shape[-1], grad_out.shape[-1], bias=False).double()
    params = {"weight": lin.weight.detach()}

    def loss(p, xn, dn):
        return (functional_call(lin, p, (xn,)) * dn).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), grad_out.double())["weight"]
    return g.square().sum(0), g.sum(0), g.square().sum((1, 2))


def make_inputs(n, t, k, m, layout, device="cpu"):
    """Samples-first fp32 tensors [N, T, K] / [N, T, M] and the views passed to the kernels:
    'batch0' [N, T, *], 'seq' [T, N, *] (batch_dim=1, a real sequence-first tensor), '2d' [N, *]."""
    x, d = torch.randn(n, t, k), torch.randn(n, t, m)
    if layout == "seq":
        return x, d, x.transpose(0, 1).contiguous().to(device), d.transpose(0, 1).contiguous().to(device), 1
    if layout == "2d":
        return x, d, x[:, 0].to(device), d[:, 0].to(device), 0
    return x, d, x.to(device), d.to(device), 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["batch0", "seq", "2d"])
def test_linear_against_oracles(backend, shape, layout):
    n, t, k, m = shape
    if layout == "2d":
        t = 1
    x, d, xi, di, bd = make_inputs(n, t, k, m, layout, DEVICE.get(backend, "cpu"))
    f_ref, g_ref, sq_ref = linear_oracle(x, d)
    grad_weight = torch.full((m, k), float("nan"), device=xi.device)
    f = fk.per_sample_fisher(xi, di, batch_dim=bd, grad_weight=grad_weight, backend=backend)
    sq = fk.per_sample_sq_norms(xi, di, batch_dim=bd, backend=backend)
    assert f.shape == (m, k) and f.dtype == torch.float32 and sq.shape == (n,)
    assert rel_err(f, f_ref) < RTOL
    assert rel_err(grad_weight, g_ref) < RTOL
    assert rel_err(sq, sq_ref) < RTOL
    assert rel_err(f, reference.per_sample_fisher(x, d, dtype=torch.float64)) < RTOL


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(2, 140, 530, 270), (1030, 1, 40, 9)])
def test_cpu_blocks_larger_than_the_largest_tile(threads, shape):
    """Cross the cpu kernel's largest block (256 x 512), its 128-row chunk and its
    1024-sample chunk (T = 1); the block split depends on the number of threads."""
    n, t, k, m = shape
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, d, xi, di, bd = make_inputs(n, t, k, m, "seq")
        grad_weight = torch.empty(m, k)
        f = fk.per_sample_fisher(xi, di, batch_dim=bd, grad_weight=grad_weight, backend="cpu")
        sq = fk.per_sample_sq_norms(xi, di, batch_dim=bd, backend="cpu")
    finally:
        torch.set_num_threads(before)
    f_ref, g_ref, sq_ref = linear_oracle(x, d)
    assert rel_err(f, f_ref) < RTOL and rel_err(grad_weight, g_ref) < RTOL and rel_err(sq, sq_ref) < RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_accumulation_and_transposed_strides(backend):
    device = DEVICE.get(backend, "cpu")
    x, d = torch.randn(6, 9, 33), torch.randn(6, 9, 20)
    # Non-contiguous feature dim: views of [N, K, T] tensors, read by strides.
    xv = x.transpose(1, 2).contiguous().to(device).transpose(1, 2)
    dv = d.transpose(1, 2).contiguous().to(device).transpose(1, 2)
    f = fk.per_sample_fisher(xv, dv, dtype=torch.float64, backend=backend)
    assert f.dtype == torch.float64
    assert rel_err(f, linear_oracle(x, d)[0]) < RTOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 5])
def test_accumulating_batches_equals_one_batch(backend, t):
    device = DEVICE.get(backend, "cpu")
    x, d = torch.randn(7, t, 33, device=device), torch.randn(7, t, 18, device=device)
    out = torch.zeros(18, 33, dtype=torch.float64, device=device)
    for s in (slice(0, 2), slice(2, 3), slice(3, 7)):
        assert fk.per_sample_fisher(x[s], d[s], out=out, backend=backend) is out
    assert rel_err(out, fk.per_sample_fisher(x, d, dtype=torch.float64, backend=backend)) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 9])
def test_poisoned_outputs_are_fully_written(backend, t):
    """Every output element must be written when not accumulating: NaN anywhere fails."""
    device = DEVICE.get(backend, "cpu")
    x, d = torch.randn(5, t, 70, device=device), torch.randn(5, t, 41, device=device)
    for dtype in (torch.float32, torch.float64):
        f = torch.full((41, 70), float("nan"), dtype=dtype, device=device)
        g = torch.full((41, 70), float("nan"), dtype=dtype, device=device)
        sq = torch.full((5,), float("nan"), dtype=dtype, device=device)
        backends.impl("per_sample_fisher", backend).compute(x, d, 0, f, g, sq, False)
        f_ref, g_ref, sq_ref = linear_oracle(x.cpu(), d.cpu())
        assert rel_err(f, f_ref) < RTOL and rel_err(g, g_ref) < RTOL and rel_err(sq, sq_ref) < RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_zeros(backend):
    device = DEVICE.get(backend, "cpu")
    f = fk.per_sample_fisher(torch.randn(0, 3, 5, device=device), torch.randn(0, 3, 4, device=device),
                             backend=backend)
    assert torch.equal(f.cpu(), torch.zeros(4, 5))


@pytest.mark.skipif("cpu" not in AVAILABLE, reason="fqkernels._cpu is not built")
def test_cpu_reads_bfloat16_directly():
    x, d = torch.randn(4, 11, 40).bfloat16(), torch.randn(4, 11, 24).bfloat16()
    f = fk.per_sample_fisher(x, d, batch_dim=0, backend="cpu")
    assert rel_err(f, linear_oracle(x.double(), d.double())[0]) < RTOL


def conv_oracle(conv, x, grad_out):
    params = {"weight": conv.weight.detach().double()}
    conv = conv.double()

    def loss(p, xn, dn):
        return (functional_call(conv, p, (xn[None],))[0] * dn).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), grad_out.double())["weight"]
    return g.square().sum(0)


# (N, C, O, H, W, kernel, stride, padding, dilation, groups)
CONVS = [(3, 4, 6, 9, 11, 3, 1, 1, 1, 1), (2, 6, 4, 10, 7, 3, 2, 0, 2, 2), (4, 3, 3, 8, 8, 1, 1, 0, 1, 3),
         (2, 4, 8, 13, 9, (3, 2), (1, 2), (2, 1), 1, 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONVS)
@pytest.mark.parametrize("chunk_bytes", [1 << 30, 3000, 64])
def test_conv2d_against_torch_func(backend, cfg, chunk_bytes):
    """Large budget: all samples unfolded at once; 3000 bytes: one sample per chunk, or
    the per-sample weight-gradient path for the larger maps; 64 bytes: always the latter."""
    n, c, o, h, w, k, s, p, dil, groups = cfg
    device = DEVICE.get(backend, "cpu")
    conv = torch.nn.Conv2d(c, o, k, s, p, dil, groups, bias=False)
    x = torch.randn(n, c, h, w)
    grad_out = torch.randn_like(conv(x))
    f = fk.conv2d_per_sample_fisher(x.to(device), grad_out.to(device), tuple(conv.weight.shape), s, p, dil, groups,
                                    chunk_bytes=chunk_bytes, backend=backend)
    assert f.shape == conv.weight.shape
    assert rel_err(f, conv_oracle(conv, x, grad_out)) < RTOL


@pytest.mark.parametrize("cfg", CONVS)
@pytest.mark.parametrize("chunk_bytes", [1 << 30, 64])  # unfolded chunks / torch's per-sample weight gradient
def test_conv2d_with_fisher_matches_autograd(cfg, chunk_bytes):
    n, c, o, h, w, k, s, p, dil, groups = cfg
    conv = torch.nn.Conv2d(c, o, k, s, p, dil, groups)
    x = torch.randn(n, c, h, w, requires_grad=True)
    r = torch.randn_like(conv(x))
    (conv(x) * r).sum().backward()
    expected = [x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()]
    x.grad = None
    conv.zero_grad()
    fisher = torch.zeros_like(conv.weight)
    y = fk.conv2d_with_fisher(x, conv.weight, conv.bias, fisher, s, p, dil, groups, chunk_bytes=chunk_bytes)
    assert torch.equal(y, conv(x))
    (y * r).sum().backward()
    # dW comes from per-sample sums (another order of the same fp32 additions): RTOL as above.
    for got, want in zip([x.grad, conv.weight.grad, conv.bias.grad], expected):
        assert rel_err(got, want) < RTOL
    assert rel_err(fisher, conv_oracle(conv, x.detach(), r)) < RTOL


def test_conv2d_with_fisher_bad_inputs():
    w, f = torch.randn(4, 3, 3, 3), torch.zeros(4, 3, 3, 3)
    with pytest.raises(ValueError, match="x: expected 3 channels"):
        fk.conv2d_with_fisher(torch.randn(2, 5, 8, 8), w, None, f)
    with pytest.raises(ValueError, match="fisher"):
        fk.conv2d_with_fisher(torch.randn(2, 3, 8, 8), w, None, torch.zeros(4, 3, 3))
    with pytest.raises(ValueError, match="groups"):
        fk.conv2d_with_fisher(torch.randn(2, 3, 8, 8), w, None, f, groups=3)


def test_bad_inputs_name_the_argument():
    x, d = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    cases = [
        (lambda: fk.per_sample_fisher(x, torch.randn(2, 4, 5)), ValueError, "grad_out"),
        (lambda: fk.per_sample_fisher(x, d[0]), ValueError, "grad_out"),
        (lambda: fk.per_sample_fisher(x.int(), d), TypeError, "x"),
        (lambda: fk.per_sample_fisher(x, d.double()), TypeError, "grad_out"),
        (lambda: fk.per_sample_fisher(x, d.to("meta")), ValueError, "grad_out"),
        (lambda: fk.per_sample_fisher(x, d, batch_dim=2), ValueError, "batch_dim"),
        (lambda: fk.per_sample_fisher(x[:, 0], d[:, 0], batch_dim=1), ValueError, "batch_dim"),
        (lambda: fk.per_sample_fisher(x, d, dtype=torch.float16), TypeError, "dtype"),
        (lambda: fk.per_sample_fisher(x, d, out=torch.zeros(4, 5)), ValueError, "out"),
        (lambda: fk.per_sample_fisher(x, d, out=torch.zeros(5, 4, dtype=torch.int32)), TypeError, "out"),
        (lambda: fk.per_sample_fisher(x, d, grad_weight=torch.zeros(4, 5).t()), ValueError, "grad_weight"),
        (lambda: fk.per_sample_fisher(x, d, backend="nope"), ValueError, "backend"),
        (lambda: fk.per_sample_sq_norms(torch.randn(2, 3, 4, 5), d), ValueError, "x"),
        (lambda: fk.conv2d_per_sample_fisher(torch.randn(2, 4, 8, 8), torch.randn(2, 6, 6, 6), (6, 4, 3, 3),
                                             groups=4), ValueError, "groups"),
        (lambda: fk.conv2d_per_sample_fisher(torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8), (6, 4, 3, 3)),
         ValueError, "grad_out"),
        (lambda: fk.conv2d_per_sample_fisher(torch.randn(2, 3, 8, 8), torch.randn(2, 6, 6, 6), (6, 4, 3, 3)),
         ValueError, "x"),
        (lambda: fk.conv2d_per_sample_fisher(torch.randn(2, 4, 8, 8), torch.randn(2, 6, 6, 6), (6, 4, 3, 3),
                                             stride=(1, 1, 1)), TypeError, "stride"),
    ]
    for fn, err, name in cases:
        with pytest.raises(err, match=name):
            fn()


@pytest.mark.skipif("cpu" not in AVAILABLE, reason="fqkernels._cpu is not built")
def test_cpu_binding_checks_its_inputs():
    """The compiled entry point checks on its own (it is callable without the Python glue)."""
    x, d, f = torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.zeros(5, 4)
    call = _ext._cpu.per_sample_fisher
    dl = _ext.dl
    cases = [
        (lambda: call(dl(x), dl(torch.randn(2, 4, 5)), dl(f), None, None, 0), ValueError, "grad_out"),
        (lambda: call(dl(x), dl(d.double()), dl(f), None, None, 0), TypeError, "grad_out"),
        (lambda: call(dl(x.int()), dl(d), dl(f), None, None, 0), TypeError, "x"),
        (lambda: call(dl(x), dl(d), dl(torch.zeros(4, 5)), None, None, 0), ValueError, "fisher"),
        (lambda: call(dl(x), dl(d), None, dl(torch.zeros(5, 4).half()), None, 0), TypeError, "grad_weight"),
        (lambda: call(dl(x), dl(d), None, None, dl(torch.zeros(3)), 0), ValueError, "sq_norms"),
        (lambda: call(dl(x), dl(d), dl(f), None, None, 2), ValueError, "batch_dim"),
        (lambda: call(x, dl(d), dl(f), None, None, 0), TypeError, "x"),
    ]
    for fn, err, name in cases:
        with pytest.raises(err, match=name):
            fn()


def test_registered_backends_and_quant_linear_contract():
    """The op is registered for every backend; quant_linear's Fisher hook calls
    per_sample_fisher(x, grad_out, batch_dim=..., dtype=...) and gets a fresh tensor."""
    for b in ("reference", "cpu", "triton", "cuda"):
        assert ("per_sample_fisher", b) in backends._IMPLS
    x, d = torch.randn(3, 4, 5), torch.randn(3, 4, 6)
    f = fisher_ops.per_sample_fisher(x, d, batch_dim=0, dtype=torch.float64)
    assert f.dtype == torch.float64 and rel_err(f, linear_oracle(x, d)[0]) < RTOL


@pytest.mark.skipif("cpu" not in AVAILABLE, reason="fqkernels._cpu is not built")
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_cpu_fallback_microkernels(monkeypatch, isa):
    """The AVX2 and portable microkernels (picked on machines without AVX-512) give the
    same results; FQ_FISHER_ISA caps the run-time choice."""
    monkeypatch.setenv("FQ_FISHER_ISA", isa)
    for t in (1, 13):
        x, d = torch.randn(5, t, 70), torch.randn(5, t, 41)  # full 8 x 32 tiles and partial ones
        grad_weight = torch.empty(41, 70)
        f = fk.per_sample_fisher(x, d, grad_weight=grad_weight, backend="cpu")
        sq = fk.per_sample_sq_norms(x, d, backend="cpu")
        f_ref, g_ref, sq_ref = linear_oracle(x, d)
        assert rel_err(f, f_ref) < RTOL and rel_err(grad_weight, g_ref) < RTOL and rel_err(sq, sq_ref) < RTOL


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("layout", ["batch0", "seq", "2d"])
def test_linear_with_fisher_backward(backend, layout):
    """linear_with_fisher: x, weight and bias gradients as nn.Linear's, and the Fisher of
    the weight from the same backward (dW comes from the kernel's pass)."""
    device = DEVICE.get(backend, "cpu")
    x, d, xi, di, bd = make_inputs(4, 1 if layout == "2d" else 6, 33, 17, layout, device)
    lin = torch.nn.Linear(33, 17).to(device)
    fisher = torch.zeros(17, 33, device=device)
    xa, xb = xi.clone().requires_grad_(), xi.clone().requires_grad_()
    (fk.linear_with_fisher(xa, lin.weight, lin.bias, fisher, bd, backend=backend) * di).sum().backward()
    ours = (xa.grad, lin.weight.grad.clone(), lin.bias.grad.clone())
    lin.zero_grad()
    (lin(xb) * di).sum().backward()
    for a, b in zip(ours, (xb.grad, lin.weight.grad, lin.bias.grad)):
        assert rel_err(a, b) < RTOL
    assert rel_err(fisher, linear_oracle(x, d)[0]) < RTOL


@pytest.mark.skipif("cpu" not in AVAILABLE, reason="fqkernels._cpu is not built")
@pytest.mark.parametrize("layout", ["batch0", "seq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_long_samples_use_per_sample_gemm(monkeypatch, layout, dtype):
    """Samples of >= MM_LOOP_MIN_T tokens take the per-sample torch.mm path (lowered here
    so that small shapes reach it): same results, poisoned outputs fully written."""
    monkeypatch.setattr(fisher_ops, "MM_LOOP_MIN_T", 4)
    x, d, xi, di, bd = make_inputs(3, 9, 33, 20, layout)
    f_ref, g_ref, sq_ref = linear_oracle(x, d)
    f, g, sq = (torch.full(s, float("nan"), dtype=dtype) for s in ((20, 33), (20, 33), (3,)))
    backends.impl("per_sample_fisher", "cpu").compute(xi, di, bd, f, g, sq, False)
    assert rel_err(f, f_ref) < RTOL and rel_err(g, g_ref) < RTOL and rel_err(sq, sq_ref) < RTOL
    backends.impl("per_sample_fisher", "cpu").compute(xi, di, bd, f, None, None, True)
    assert rel_err(f, 2 * f_ref) < RTOL
