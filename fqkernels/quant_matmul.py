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
import torch

from fqkernels import backends, checks, composite, gemm_backends, reference
from fqkernels.quant_linear import Lazy, cpu_fake_quant, cpu_ste_backward_


class _Reference:
    forward = staticmethod(reference.quant_matmul_forward)
    backward = staticmethod(reference.quant_matmul_backward)


def _f32(t):
    return t.float().contiguous()


class _Cpu:
    @staticmethod
    def _quantized(a, b, a_scale, b_scale, a_bits, b_bits, a_signed, b_signed):
        a, b, a_scale, b_scale = _f32(a), _f32(b), _f32(a_scale).reshape(1), _f32(b_scale).reshape(1)
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
        grad_a = _f32(torch.matmul(g, bq.transpose(-1, -2)).sum_to_size(a.shape))
        grad_b = _f32(torch.matmul(aq.transpose(-1, -2), g).sum_to_size(b.shape))
        grad_sa = cpu_ste_backward_(grad_a, a32, sa, a_bits, a_signed, None, a_grad_factor)
        grad_sb = cpu_ste_backward_(grad_b, b32, sb, b_bits, b_signed, None, b_grad_factor)
        return grad_a.to(a.dtype), grad_b.to(b.dtype), grad_sa.reshape(a_scale.shape), grad_sb.reshape(b_scale.shape)


backends.register("quant_matmul", "reference", _Reference())
backends.register("quant_matmul", "cpu", _Cpu())
backends.register("quant_matmul", "triton", Lazy("fqkernels.triton.quant_gemm", "QUANT_MATMUL"))
backends.register("quant_matmul", "cuda", gemm_backends.QuantMatmul(gemm_backends.cuda_quant_gemm))


@torch.library.custom_op("fqkernels::quant_matmul_forward", mutates_args=())
def quant_matmul_forward_op(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                            a_bits: int, b_bits: int, a_signed: bool, b_signed: bool, backend: str) -> torch.Tensor:
    return backends.impl("quant_matmul", backend).forward(a, b, a_scale, b_scale, a_bits, b_bits, a_signed,
                                                          b_signed)


@quant_matmul_forward_op.register_fake
def _(a, b, a_scale, b_scale, a_bits, b_bits, a_signed, b_signed, backend):
    return torch.matmul(a, b)  # fake tensors: gives the broadcast shape without computing


@torch.library.custom_op("fqkernels::quant_matmul_backward", mutates_args=())
def quant_matmul_backward_op(grad_y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor,
                             b_scale: torch.Tensor, a_bits: int, b_bits: int, a_signed: bool, b_signed: bool,
                             a_grad_factor: float, b_grad_factor: float,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.impl("quant_matmul", backend).backward(grad_y, a, b, a_scale, b_scale, a_bits, b_bits,
                                                           a_signed, b_signed, a_grad_factor, b_grad_factor)


@quant_matmul_backward_op.register_fake
def _(grad_y, a, b, a_scale, b_scale, *args):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(a_scale), torch.empty_like(b_scale)


class QuantMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, a_scale, b_scale, config):
        ctx.save_for_backward(a, b, a_scale, b_scale)
        ctx.config = config
        a_bits, b_bits, a_signed, b_signed, _, _, backend = config
        return quant_matmul_forward_op(a, b, a_scale, b_scale, a_bits, b_bits, a_signed, b_signed, backend)

    @staticmethod
    def backward(ctx, grad_y):
        a, b, a_scale, b_scale = ctx.saved_tensors
        grads = quant_matmul_backward_op(grad_y, a, b, a_scale, b_scale, *ctx.config)
        return (*grads, None)


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
    config = (a_bits, b_bits, bool(a_signed), bool(b_signed), float(a_grad_factor), float(b_grad_factor), name)
    return QuantMatmulFunction.apply(a, b, a_scale, b_scale, config)
