"""quant_matmul: Qa(a) @ Qb(b) with per-tensor scales, for the attention products
(Q K^T with signed operands, A V with unsigned attention probabilities)."""
import torch

from fqkernels import backends, checks, reference


class _Reference:
    forward = staticmethod(reference.quant_matmul_forward)
    backward = staticmethod(reference.quant_matmul_backward)


backends.register("quant_matmul", "reference", _Reference())


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
    name = backends.backend_for("quant_matmul", a, backend)
    config = (a_bits, b_bits, bool(a_signed), bool(b_signed), float(a_grad_factor), float(b_grad_factor), name)
    return QuantMatmulFunction.apply(a, b, a_scale, b_scale, config)
