"""quant_linear: y = Qa(x) Qw(W)^T + b with weights per output channel, activations
per tensor, LSQ gradients of both scales and, optionally, per-sample Fisher
accumulation of the weight gradient in the same backward pass.

Backends (all with reference.quant_linear_forward/backward's signatures; forward gets x
flattened to [R, K] and returns [R, M], a tensor it owns: see util.owned_output):
  reference  pure PyTorch (the oracle);
  cpu        exact integer forward: C++ kernels quantize x and W to int8 codes, the
             int8 x int8 -> int32 GEMM is torch._int_mm (oneDNN, AVX-512 VNNI), and a
             C++ epilogue scales the int32 accumulator in place into the float32
             output. Float path (C++ fake quant + F.linear) when activations are not
             quantized, K > _cpu.MAX_EXACT_K, or an operand holds NaN. Backward: C++
             fake quant of both operands, two fp32 torch.mm, and the STE masks and
             LSQ scale-gradient reductions in one C++ pass each (fake_quant's kernel);
  triton     fqkernels/triton/quant_gemm.py (operands quantized in the GEMM prologue);
  cuda       csrc/cuda/quant_linear.cu (same semantics, int8 WMMA for the integer path);
             both through fqkernels/gemm_backends.py.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from fqkernels import _ext, backends, checks, composite, gemm_backends, reference
from fqkernels.util import (FunctionPair, Lazy, accumulate_fisher, cpu_fake_quant, cpu_ste_backward_, f32,
                            op_or_impl, owned_output)


class _Cpu:
    """The `cpu` backend (see the module docstring)."""

    @staticmethod
    def _int_forward(x2, w, bias, w_scale, a_scale, w_bits, a_bits, a_signed):
        """Exact integer path on 2-D float32 inputs; None where it does not apply (K too long for
        int32 sums, or an empty operand: torch._int_mm wants non-empty ones)."""
        if w.shape[1] > _ext._cpu.MAX_EXACT_K or not (x2.numel() and w.numel()):
            return None
        x_codes = torch.empty(x2.shape, dtype=torch.int8)
        w_codes_t = torch.empty(w.shape[1], w.shape[0], dtype=torch.int8)
        row_sums = torch.empty(w.shape[0], dtype=torch.int32)
        if _ext._cpu.quant_weight_codes_t(_ext.dl(w), _ext.dl(w_scale), _ext.dl(w_codes_t), _ext.dl(row_sums),
                                          w_bits):
            return None
        if _ext._cpu.quant_act_codes(_ext.dl(x2), _ext.dl(a_scale), _ext.dl(x_codes), a_bits, a_signed):
            return None
        # The epilogue scales the int32 accumulator in place into float32: the float32 tensor
        # owns the memory, so the output is no view (see util.owned_output).
        y = torch.empty(x2.shape[0], w.shape[0], dtype=torch.float32)
        acc = torch._int_mm(x_codes, w_codes_t, out=y.view(torch.int32))
        _ext._cpu.int_accum_epilogue(_ext.dl(acc), _ext.dl(a_scale), _ext.dl(w_scale), _ext.dl(row_sums),
                                     None if bias is None else _ext.dl(bias), a_bits, a_signed)
        return y

    def forward(self, x, weight, bias, w_scale, a_scale, w_bits, a_bits, a_signed=True):
        x2, w = f32(reference.rows(x)), f32(weight)
        bias = None if bias is None else f32(bias)
        w_scale = f32(w_scale).reshape(-1)  # [M] or [M, 1], as the reference takes it
        y = None
        if a_bits is not None:
            a_scale = f32(a_scale).reshape(1)
            y = self._int_forward(x2, w, bias, w_scale, a_scale, w_bits, a_bits, a_signed)
        if y is None:
            xq = x2 if a_bits is None else cpu_fake_quant(x2, a_scale, a_bits, a_signed)
            y = F.linear(xq, cpu_fake_quant(w, w_scale, w_bits, True, 0), bias)
        return y.to(x.dtype)

    def backward(self, grad_y, x, weight, w_scale, a_scale, w_bits, a_bits, a_signed=True, w_grad_factor=1.0,
                 a_grad_factor=1.0, fisher=None, batch_dim=0):
        x2, w = f32(reference.rows(x)), f32(weight)
        g = f32(reference.rows(grad_y))
        w_scale = f32(w_scale).reshape(-1)
        xq = x2
        if a_bits is not None:
            a_scale = f32(a_scale).reshape(1)
            xq = cpu_fake_quant(x2, a_scale, a_bits, a_signed)
        grad_x = torch.mm(g, cpu_fake_quant(w, w_scale, w_bits, True, 0))
        if fisher is None:
            grad_w = torch.mm(g.t(), xq)
        else:  # the Fisher kernel's pass yields the weight gradient too
            grad_w = torch.empty(w.shape, dtype=torch.float32)
            accumulate_fisher(fisher, xq.reshape(x.shape), g.reshape(grad_y.shape), w, w_scale, w_bits, batch_dim,
                              grad_w)
        grad_a_scale = None
        if a_bits is not None:
            grad_a_scale = cpu_ste_backward_(grad_x, x2, a_scale, a_bits, a_signed, None, a_grad_factor)
        grad_w_scale = cpu_ste_backward_(grad_w, w, w_scale, w_bits, True, 0, w_grad_factor)
        return (grad_x.reshape(x.shape).to(x.dtype), grad_w.to(weight.dtype), g.sum(0), grad_w_scale,
                grad_a_scale)


backends.register("quant_linear", "reference",
                  FunctionPair(reference.quant_linear_forward, reference.quant_linear_backward))
backends.register("quant_linear", "cpu", _Cpu())
backends.register("quant_linear", "triton", Lazy("fqkernels.triton.quant_gemm", "QUANT_LINEAR"))
backends.register("quant_linear", "cuda", gemm_backends.QuantLinear(gemm_backends.cuda_quant_gemm))


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             w_scale: torch.Tensor, a_scale: Optional[torch.Tensor], w_bits: int,
             a_bits: Optional[int], a_signed: bool, backend: str) -> torch.Tensor:
    """x [R, K] -> contiguous [R, M] (callers flatten and restore the leading dims outside)."""
    return owned_output(backends.impl("quant_linear", backend).forward(x, weight, bias, w_scale, a_scale, w_bits,
                                                                       a_bits, a_signed))


# The op for torch.compile / export; eager calls run _forward itself (see util.op_or_impl).
quant_linear_forward_op = torch.library.custom_op("fqkernels::quant_linear_forward", _forward, mutates_args=())


@quant_linear_forward_op.register_fake
def _(x, weight, bias, w_scale, a_scale, w_bits, a_bits, a_signed, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
    a_scale: Optional[torch.Tensor], w_bits: int, a_bits: Optional[int], a_signed: bool,
    w_grad_factor: float, a_grad_factor: float, fisher: Optional[torch.Tensor], batch_dim: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns contiguous (grad_x, grad_weight, grad_bias, grad_w_scale, grad_a_scale); a custom op
    cannot return None, so grad_a_scale is an empty tensor when activations are not quantized."""
    grads = backends.impl("quant_linear", backend).backward(
        grad_y, x, weight, w_scale, a_scale, w_bits, a_bits, a_signed, w_grad_factor, a_grad_factor, fisher,
        batch_dim)
    grad_w_scale = grads[3].reshape(w_scale.shape)
    grad_a_scale = w_scale.new_empty(0, dtype=torch.float32) if a_scale is None else grads[4].reshape(a_scale.shape)
    return tuple(g.contiguous() for g in (*grads[:3], grad_w_scale, grad_a_scale))


quant_linear_backward_op = torch.library.custom_op("fqkernels::quant_linear_backward", _backward,
                                                   mutates_args=("fisher",))


@quant_linear_backward_op.register_fake
def _(grad_y, x, weight, w_scale, a_scale, w_bits, a_bits, a_signed, w_gf, a_gf, fisher, batch_dim, backend):
    grad_b = weight.new_empty(weight.shape[0], dtype=torch.float32)
    grad_a = weight.new_empty(0 if a_scale is None else a_scale.shape, dtype=torch.float32)
    return (x.new_empty(x.shape), weight.new_empty(weight.shape), grad_b,
            weight.new_empty(w_scale.shape, dtype=torch.float32), grad_a)


class LinearConfig(NamedTuple):
    """The non-tensor arguments of one quant_linear call."""
    w_bits: int
    a_bits: Optional[int]
    a_signed: bool
    w_grad_factor: float
    a_grad_factor: float
    fisher_batch_dim: int
    backend: str


class QuantLinearFunction(torch.autograd.Function):
    """x [*, K] -> [R, M], R the product of x's leading dims: the output owns its memory, and
    the caller's reshape to [*, M] is an ordinary view that autograd tracks."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_scale, a_scale, config, fisher):
        ctx.save_for_backward(x, weight, w_scale, a_scale)
        ctx.config, ctx.fisher, ctx.has_bias = config, fisher, bias is not None
        run = op_or_impl(quant_linear_forward_op, _forward, x, weight)
        return run(reference.rows(x), weight, bias, w_scale, a_scale, config.w_bits,
                                       config.a_bits, config.a_signed, config.backend)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, w_scale, a_scale = ctx.saved_tensors
        c = ctx.config
        grad_y = grad_y.reshape(*x.shape[:-1], weight.shape[0])  # the Fisher reads samples in x's layout
        run = op_or_impl(quant_linear_backward_op, _backward, grad_y, x, weight)
        grad_x, grad_w, grad_b, grad_ws, grad_as = run(
            grad_y, x, weight, w_scale, a_scale, c.w_bits, c.a_bits, c.a_signed, c.w_grad_factor, c.a_grad_factor,
            ctx.fisher, c.fisher_batch_dim, c.backend)
        grad_b = grad_b.to(weight.dtype) if ctx.has_bias else None
        grad_as = grad_as if a_scale is not None else None
        return grad_x, grad_w, grad_b, grad_ws, grad_as, None, None


def quant_linear(x, weight, bias=None, w_scale=None, a_scale=None, w_bits=4, a_bits=8, a_signed=True,
                 fisher=None, fisher_batch_dim=0, w_grad_factor=1.0, a_grad_factor=1.0, backend=None):
    """Fused y = Qa(x) Qw(W)^T + b.

    x [*, K]; weight [M, K]; bias [M] or None; w_scale: [M] (per output channel) or float;
    a_scale: 1 element or float (per tensor); ``a_bits=None`` skips activation quantization.
    fisher: optional float32/float64 [M, K] buffer; the backward adds sum_n g_n^2 into it, with
    g_n the weight gradient of sample n along ``fisher_batch_dim`` of x ([N, T, K] or [T, N, K];
    a 2-D x is one token per sample). Returns [*, M].
    """
    checks.check_tensor(x, "x", dim=tuple(range(1, 9)))
    checks.check_tensor(weight, "weight", dim=2)
    checks.check_same_device(x, "x", weight, "weight")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dimension {weight.shape[1]} (weight is {list(weight.shape)}), "
                         f"got shape {list(x.shape)}")
    if bias is not None:
        checks.check_tensor(bias, "bias", dim=1)
        checks.check_same_device(x, "x", bias, "bias")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape [{weight.shape[0]}], got {list(bias.shape)}")
    checks.check_bits(w_bits, "w_bits")
    w_scale = checks.as_scale(w_scale, "w_scale", weight, weight.shape[0])
    if a_bits is not None:
        checks.check_bits(a_bits, "a_bits")
        a_scale = checks.as_scale(a_scale, "a_scale", x, 1)
    else:
        a_scale = None
    if fisher is not None:
        checks.check_tensor(fisher, "fisher", dtypes=(torch.float32, torch.float64), dim=2)
        checks.check_same_device(x, "x", fisher, "fisher")
        if tuple(fisher.shape) != tuple(weight.shape):
            raise ValueError(f"fisher: expected shape {list(weight.shape)}, got {list(fisher.shape)}")
        if x.dim() == 3 and fisher_batch_dim not in (0, 1):
            raise ValueError(f"fisher_batch_dim: expected 0 or 1 for a 3-D x, got {fisher_batch_dim}")
        if x.dim() > 3:
            raise ValueError(f"x: per-sample Fisher needs a 2-D or 3-D input, got shape {list(x.shape)}")
    if composite.active():
        if fisher is not None:
            raise ValueError("fisher: per-sample Fisher accumulation is not available inside fk.differentiable()")
        return composite.quant_linear(x, weight, bias, w_scale, a_scale, w_bits, a_bits, bool(a_signed),
                                      float(w_grad_factor), float(a_grad_factor))
    name = backends.backend_for("quant_linear", x, backend)
    config = LinearConfig(w_bits, a_bits, bool(a_signed), float(w_grad_factor), float(a_grad_factor),
                          fisher_batch_dim, name)
    y = QuantLinearFunction.apply(x, weight, bias, w_scale, a_scale, config, fisher)
    return y.reshape(*x.shape[:-1], weight.shape[0])
