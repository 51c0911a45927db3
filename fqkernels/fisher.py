"""per_sample_fisher / per_sample_sq_norms: the squared per-sample weight gradients of
a linear map, summed over samples (diag of the empirical Fisher times N) or reduced
to one squared norm per sample, without materialising per-sample gradients in the
compiled backends; optionally the weight gradient dW = sum_n D_n^T X_n in the same pass.

Every backend implements one call, ``compute(x, grad_out, batch_dim, fisher, grad_weight,
sq_norms, accumulate_fisher)``, writing the outputs it is given (None: not wanted):
  fisher      [M, K] float32/float64: (+)= sum_n (D_n^T X_n)^2 (adds when accumulate_fisher)
  grad_weight [M, K] float32/float64:   = sum_n D_n^T X_n
  sq_norms    [N]    float32/float64:   = ||D_n^T X_n||_F^2
Inputs are read through their strides (either layout, no copy): x [N, T, K]
(batch_dim 0), [T, N, K] (batch_dim 1) or [N, K] (T = 1); grad_out alike with M features.
"""
from typing import Optional

import torch

from fqkernels import _ext, backends, checks, reference
from fqkernels.util import Lazy

class _Reference:
    @staticmethod
    def compute(x, grad_out, batch_dim, fisher, grad_weight, sq_norms, accumulate_fisher):
        if fisher is not None:
            f = reference.per_sample_fisher(x, grad_out, batch_dim, fisher.dtype)
            fisher.add_(f) if accumulate_fisher else fisher.copy_(f)
        if grad_weight is not None:
            xs, ds = reference._samples(x, grad_out, batch_dim)
            dt = grad_weight.dtype
            grad_weight.copy_(reference.rows(ds).to(dt).t() @ reference.rows(xs).to(dt))
        if sq_norms is not None and sq_norms.numel():
            sq_norms.copy_(reference.per_sample_sq_norms(x, grad_out, batch_dim, sq_norms.dtype))


# Optional hybrid for the cpu backend: samples of at least MM_LOOP_MIN_T tokens go
# through torch's GEMM one sample at a time (a weight-sized G buffer, then
# square-accumulate). Off (None) by default: on a quiet 2-core machine MKL's per-sample
# GEMMs beat the C++ tiles by 10-25% for T = 850, but with other processes on the cores
# they lose 1.5-3x (every call is an OpenMP region with its own barriers), while the tiles
# stay within ~1.3-1.4x of the plain weight-gradient matmul either way
# (benchmarks/RESULTS.md, "per-sample Fisher (CPU)"). Set e.g. 512 on a dedicated machine.
MM_LOOP_MIN_T = None


def _mm_loop(x, grad_out, batch_dim, fisher, grad_weight, sq_norms, accumulate_fisher):
    """Per-sample torch.mm into one [M, K] buffer; each sample's G is squared into the
    Fisher, added into dW and reduced to its norm before the next overwrites it."""
    xs, ds = reference._samples(x, grad_out, batch_dim)
    xs, ds = xs.float(), ds.float()
    g = torch.empty(ds.shape[-1], xs.shape[-1], dtype=torch.float32, device=x.device)
    if fisher is not None and not accumulate_fisher:
        fisher.zero_()
    if grad_weight is not None:
        grad_weight.zero_()
    for n in range(xs.shape[0]):
        torch.mm(ds[n].t(), xs[n], out=g)
        if fisher is not None:
            fisher.addcmul_(g, g) if fisher.dtype == torch.float32 else fisher.add_(g.to(fisher.dtype).square())
        if grad_weight is not None:
            grad_weight.add_(g)
        if sq_norms is not None:
            sq_norms[n] = torch.dot(g.view(-1), g.view(-1))


class _Compiled:
    """fqkernels._cpu / fqkernels._cuda: one pass producing every requested output.
    The CPU kernel reads float32 and bfloat16 directly; other dtypes are converted."""

    def __init__(self, device):
        self.device = device

    def compute(self, x, grad_out, batch_dim, fisher, grad_weight, sq_norms, accumulate_fisher):
        long_samples = MM_LOOP_MIN_T is not None and x.dim() == 3 and x.shape[1 - batch_dim] >= MM_LOOP_MIN_T
        if self.device == "cpu" and long_samples:
            return _mm_loop(x, grad_out, batch_dim, fisher, grad_weight, sq_norms, accumulate_fisher)
        native = (torch.float32, torch.bfloat16) if self.device == "cpu" else (torch.float32,)
        if x.dtype not in native or grad_out.dtype != x.dtype:
            x, grad_out = x.float(), grad_out.float()
        opt = lambda t: None if t is None else _ext.dl(t)  # noqa: E731
        args = (_ext.dl(x), _ext.dl(grad_out), opt(fisher), opt(grad_weight), opt(sq_norms), batch_dim,
                accumulate_fisher, False)
        if self.device == "cpu":
            _ext._cpu.per_sample_fisher(*args)
        else:
            _ext._cuda.per_sample_fisher(*args, stream=_ext.stream_of(x))


backends.register("per_sample_fisher", "reference", _Reference())
backends.register("per_sample_fisher", "cpu", _Compiled("cpu"))
backends.register("per_sample_fisher", "cuda", _Compiled("cuda"))
backends.register("per_sample_fisher", "triton", Lazy("fqkernels.triton.fisher"))


@torch.library.custom_op("fqkernels::per_sample_fisher_", mutates_args=("fisher", "grad_weight", "sq_norms"))
def per_sample_fisher_op(x: torch.Tensor, grad_out: torch.Tensor, batch_dim: int, fisher: Optional[torch.Tensor],
                         grad_weight: Optional[torch.Tensor], sq_norms: Optional[torch.Tensor],
                         accumulate_fisher: bool, backend: str) -> None:
    backends.impl("per_sample_fisher", backend).compute(x, grad_out, batch_dim, fisher, grad_weight, sq_norms,
                                                        accumulate_fisher)


@per_sample_fisher_op.register_fake
def _(x, grad_out, batch_dim, fisher, grad_weight, sq_norms, accumulate_fisher, backend):
    return None


def _check(x, grad_out, batch_dim, dtype):
    checks.check_tensor(x, "x", dim=(2, 3))
    checks.check_tensor(grad_out, "grad_out", dim=(2, 3))
    checks.check_same_device(x, "x", grad_out, "grad_out")
    if grad_out.dim() != x.dim() or grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"grad_out: expected leading dims {list(x.shape[:-1])} of x, got shape "
                         f"{list(grad_out.shape)}")
    if isinstance(batch_dim, bool) or batch_dim not in (0, 1) or (x.dim() == 2 and batch_dim != 0):
        raise ValueError(f"batch_dim: expected 0 (or 1 for a 3-D [T, N, K] input), got {batch_dim}")
    if dtype not in checks.ACCUM_DTYPES:
        raise TypeError(f"dtype: expected torch.float32 or torch.float64 accumulation, got {dtype}")


def num_samples(x, batch_dim=0):
    return x.shape[batch_dim] if x.dim() == 3 else x.shape[0]


def per_sample_fisher(x, grad_out, batch_dim=0, dtype=torch.float32, out=None, grad_weight=None, backend=None):
    """sum_n (D_n^T X_n)^2 -> [M, K].

    x: [N, T, K] (batch_dim=0), [T, N, K] (batch_dim=1) or [N, K] (one token per sample);
    grad_out: the gradient of the per-sample-summed loss w.r.t. the layer output, same
    layout with M features. Any strides (no copies for float32/bfloat16 on CPU).
    dtype: accumulation dtype of a new result (float32, or float64 for long sums).
    out: optional float32/float64 [M, K] buffer the result is ADDED into (then returned).
    grad_weight: optional float32/float64 [M, K] buffer that receives (is overwritten
    with) the ordinary weight gradient sum_n D_n^T X_n, from the same pass.
    """
    _check(x, grad_out, batch_dim, dtype)
    shape = (grad_out.shape[-1], x.shape[-1])
    if out is not None:
        checks.check_output(out, "out", shape, x)
    if grad_weight is not None:
        checks.check_output(grad_weight, "grad_weight", shape, x)
    name = backends.backend_for("per_sample_fisher", x, backend)
    accumulate = out is not None
    fisher = out if accumulate else torch.empty(shape, dtype=dtype, device=x.device)
    per_sample_fisher_op(x, grad_out, batch_dim, fisher, grad_weight, None, accumulate, name)
    return fisher


def per_sample_sq_norms(x, grad_out, batch_dim=0, dtype=torch.float32, backend=None):
    """||D_n^T X_n||_F^2 for each sample -> [N] in ``dtype`` (layouts as per_sample_fisher)."""
    _check(x, grad_out, batch_dim, dtype)
    name = backends.backend_for("per_sample_fisher", x, backend)
    sq = torch.empty(num_samples(x, batch_dim), dtype=dtype, device=x.device)
    per_sample_fisher_op(x, grad_out, batch_dim, None, None, sq, False, name)
    return sq


class _LinearWithFisher(torch.autograd.Function):
    """y = x W^T + b whose backward takes dW from the Fisher kernel's pass (so collecting
    the Fisher costs the kernel instead of an extra weight-gradient matmul)."""

    @staticmethod
    def forward(ctx, x, weight, bias, fisher, batch_dim, backend):
        ctx.save_for_backward(x, weight)
        ctx.fisher, ctx.batch_dim, ctx.backend, ctx.has_bias = fisher, batch_dim, backend, bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = grad_y @ weight.to(grad_y.dtype) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        per_sample_fisher(x, grad_y, ctx.batch_dim, out=ctx.fisher, grad_weight=grad_w, backend=ctx.backend)
        grad_b = grad_y.sum(tuple(range(grad_y.dim() - 1))).to(weight.dtype) if ctx.has_bias else None
        return grad_x, grad_w.to(weight.dtype), grad_b, None, None, None


def linear_with_fisher(x, weight, bias, fisher, batch_dim=0, backend=None):
    """F.linear whose backward also adds sum_n (D_n^T X_n)^2 into ``fisher`` ([out, in],
    float32/float64) in the same kernel pass that produces dW: the float-layer
    counterpart of ``quant_linear(..., fisher=...)``. x: [N, T, in] / [T, N, in]
    (``batch_dim``) or [N, in]."""
    checks.check_tensor(weight, "weight", dim=2)
    if x.shape[-1:] != weight.shape[1:]:
        raise ValueError(f"x: expected last dimension {weight.shape[1]} (weight is {list(weight.shape)}), "
                         f"got shape {list(x.shape)}")
    # grad_out will have x's leading dims: check x's layout against a shape-only stand-in.
    _check(x, x.new_empty(()).expand(*x.shape[:-1], weight.shape[0]), batch_dim, torch.float32)
    checks.check_output(fisher, "fisher", tuple(weight.shape), x)
    return _LinearWithFisher.apply(x, weight, bias, fisher, batch_dim, backend)
