"""quant_matmul: Qa(a) @ Qb(b) with per-tensor scales, for the attention products
(Q K^T with signed operands, A V with unsigned attention probabilities).

Backends (reference.quant_matmul_forward/backward's signatures):
  reference  pure PyTorch (the oracle);
  cpu        float path: C++ fake quantization of both operands (one pass each),
             torch.matmul, and in the backward the STE masks and LSQ scale gradients
             in one C++ pass per operand. (Attention products have K = head dim or
             batched shapes, where torch._int_mm's 2-D, per-call overhead buys
             little; the integer path is quant_linear's.)
  triton     fqkernels/triton/quant_gemm.py, cuda csrc/cuda/quant_linear.cu: the fused
             quant_gemm of quant_linear (fqkernels/gemm_backends.py), batched.
"""
from typing import NamedTuple

import torch

from fqkernels import backends, checks, composite, gemm_backends, reference
from fqkernels.util import (FunctionPair, Lazy, cpu_fake_quant, cpu_ste_backward_, f32, op_or_impl,
                            owned_output)


class _Cpu:
    @staticmethod
    def _quantized(a, b, a_scale, b_scale, a_bits, b_bits, a_signed, b_signed):
        a, b, a_scale, b_scale = f32(a), f32(b), f32(a_scale).reshape(1), f32(b_scale).reshape(1)
        return (a, b, a_scale, b_scale, cpu_fake_quant(a, a_scale, a_bits, a_signed),
                cpu_fake_quant(b, b_scale, b_bits, b_signed))

    def forward(self, a, b, a_scale, b_scale, a_bits, b_bits, a_signed=True, b_signed=True):
        *_, aq, bq = self._quantized(a, b, a_scale, b_scale, a_bits, b_bits, a_signed, b_signed)
        return torch.matmul(aq, bq).to(a.dtype)

    def backward(self, grad_y, a, b, a_scale, b_scale, a_bits, b_bits, a_signed=True, b_signed=True,
                 a_grad_factor=1.0, b_grad_factor=1.0):
        a32, b32, sa, sb, aq, bq = self._quantized(a, b, a_scale, b_scale, a_bits, b_bits, a_signed, b_signed)
        g = grad_y.float()
        # Broadcast batch dims were expanded in the product: sum them back before masking.
        grad_a = f32(torch.matmul(g, bq.transpose(-1, -2)).sum_to_size(a.shape))
        grad_b = f32(torch.matmul(aq.transpose(-1, -2), g).sum_to_size(b.shape))
        grad_sa = cpu_ste_backward_(grad_a, a32, sa, a_bits, a_signed, None, a_grad_factor)
        grad_sb = cpu_ste_backward_(grad_b, b32, sb, b_bits, b_signed, None, b_grad_factor)
        return grad_a.to(a.dtype), grad_b.to(b.dtype), grad_sa.reshape(a_scale.shape), grad_sb.reshape(b_scale.shape)


backends.register("quant_matmul", "reference",
                  FunctionPair(reference.quant_matmul_forward, reference.quant_matmul_backward))
backends.register("quant_matmul", "cpu", _Cpu())
backends.register("quant_matmul", "triton", Lazy("fqkernels.triton.quant_gemm", "QUANT_MATMUL"))
backends.register("quant_matmul", "cuda", gemm_backends.QuantMatmul(gemm_backends.cuda_quant_gemm))


def _forward(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
             a_bits: int, b_bits: int, a_signed: bool, b_signed: bool, backend: str) -> torch.Tensor:
    """Returns a contiguous [*, M, N] tensor (see util.owned_output)."""
    return owned_output(backends.impl("quant_matmul", backend).forward(a, b, a_scale, b_scale, a_bits, b_bits,
                                                                       a_signed, b_signed))


# The ops for torch.compile / export; eager calls run _forward / _backward themselves (util.op_or_impl).
quant_matmul_forward_op = torch.library.custom_op("fqkernels::quant_matmul_forward", _forward, mutates_args=())


@quant_matmul_forward_op.register_fake
def _(a, b, a_scale, b_scale, a_bits, b_bits, a_signed, b_signed, backend):
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]))


def _backward(grad_y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor,
              b_scale: torch.Tensor, a_bits: int, b_bits: int, a_signed: bool, b_signed: bool,
              a_grad_factor: float, b_grad_factor: float,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns contiguous (grad_a, grad_b, grad_a_scale, grad_b_scale)."""
    grads = backends.impl("quant_matmul", backend).backward(grad_y, a, b, a_scale, b_scale, a_bits, b_bits,
                                                            a_signed, b_signed, a_grad_factor, b_grad_factor)
    return tuple(g.contiguous() for g in grads)


quant_matmul_backward_op = torch.library.custom_op("fqkernels::quant_matmul_backward", _backward, mutates_args=())


@quant_matmul_backward_op.register_fake
def _(grad_y, a, b, a_scale, b_scale, *args):
    return (a.new_empty(a.shape), b.new_empty(b.shape), a_scale.new_empty(a_scale.shape, dtype=torch.float32),
            b_scale.new_empty(b_scale.shape, dtype=torch.float32))


class MatmulConfig(NamedTuple):
    """The non-tensor arguments of one quant_matmul call."""
    a_bits: int
    b_bits: int
    a_signed: bool
    b_signed: bool
    a_grad_factor: float
    b_grad_factor: float
    backend: str


class QuantMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, a_scale, b_scale, config):
        ctx.save_for_backward(a, b, a_scale, b_scale)
        ctx.config = config
        c = config
        run = op_or_impl(quant_matmul_forward_op, _forward, a, b)
        return run(a, b, a_scale, b_scale, c.a_bits, c.b_bits, c.a_signed, c.b_signed, c.backend)

    @staticmethod
    def backward(ctx, grad_y):
        a, b, a_scale, b_scale = ctx.saved_tensors
        c = ctx.config
        run = op_or_impl(quant_matmul_backward_op, _backward, grad_y, a, b)
        grad_a, grad_b, grad_sa, grad_sb = run(
            grad_y, a, b, a_scale, b_scale, c.a_bits, c.b_bits, c.a_signed, c.b_signed, c.a_grad_factor,
            c.b_grad_factor, c.backend)
        return grad_a, grad_b, grad_sa.reshape(a_scale.shape), grad_sb.reshape(b_scale.shape), None


def quant_matmul(a, b, a_scale, b_scale, a_bits=8, b_bits=8, a_signed=True, b_signed=True, a_grad_factor=1.0,
                 b_grad_factor=1.0, backend=None):
    """Qa(a) @ Qb(b).  a [*, M, K], b [*, K, N] (batch dims broadcast) -> [*, M, N].

    a_scale, b_scale: one element each (per tensor), finite and positive.
    """
    checks.check_tensor(a, "a", dim=tuple(range(2, 9)))
    checks.check_tensor(b, "b", dim=tuple(range(2, 9)))
    checks.check_same_device(a, "a", b, "b")
    if a.dtype != b.dtype:
        raise TypeError(f"b: expected the dtype of a ({a.dtype}), got {b.dtype}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"b: expected {a.shape[-1]} rows to match a {list(a.shape)}, got shape {list(b.shape)}")
    checks.check_bits(a_bits, "a_bits")
    checks.check_bits(b_bits, "b_bits")
    a_scale = checks.as_scale(a_scale, "a_scale", a, 1)
    b_scale = checks.as_scale(b_scale, "b_scale", b, 1)
    if composite.active():
        return composite.quant_matmul(a, b, a_scale, b_scale, a_bits, b_bits, bool(a_signed), bool(b_signed),
                                      float(a_grad_factor), float(b_grad_factor))
    name = backends.backend_for("quant_matmul", a, backend)
    config = MatmulConfig(a_bits, b_bits, bool(a_signed), bool(b_signed), float(a_grad_factor), float(b_grad_factor),
                          name)
    return QuantMatmulFunction.apply(a, b, a_scale, b_scale, config)
