"""quant_linear: y = Qa(x) Qw(W)^T + b with weights per output channel, activations
per tensor, LSQ gradients of both scales and, optionally, per-sample Fisher
accumulation of the weight gradient in the same backward pass."""
from typing import Optional

import torch

from fqkernels import backends, checks, reference


class _Reference:
    forward = staticmethod(reference.quant_linear_forward)
    backward = staticmethod(reference.quant_linear_backward)


backends.register("quant_linear", "reference", _Reference())


@torch.library.custom_op("fqkernels::quant_linear_forward", mutates_args=())
def quant_linear_forward_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            w_scale: torch.Tensor, a_scale: Optional[torch.Tensor], w_bits: int,
                            a_bits: Optional[int], a_signed: bool, backend: str) -> torch.Tensor:
    return backends.impl("quant_linear", backend).forward(x, weight, bias, w_scale, a_scale, w_bits, a_bits,
                                                          a_signed)


@quant_linear_forward_op.register_fake
def _(x, weight, bias, w_scale, a_scale, w_bits, a_bits, a_signed, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fqkernels::quant_linear_backward", mutates_args=("fisher",))
def quant_linear_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
    a_scale: Optional[torch.Tensor], w_bits: int, a_bits: Optional[int], a_signed: bool,
    w_grad_factor: float, a_grad_factor: float, fisher: Optional[torch.Tensor], batch_dim: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_x, grad_weight, grad_bias, grad_w_scale, grad_a_scale); a custom op cannot
    return None, so grad_a_scale is an empty tensor when activations are not quantized."""
    grads = backends.impl("quant_linear", backend).backward(
        grad_y, x, weight, w_scale, a_scale, w_bits, a_bits, a_signed, w_grad_factor, a_grad_factor, fisher,
        batch_dim)
    return (*grads[:4], grads[4] if grads[4] is not None else w_scale.new_empty(0))


@quant_linear_backward_op.register_fake
def _(grad_y, x, weight, w_scale, a_scale, w_bits, a_bits, a_signed, w_gf, a_gf, fisher, batch_dim, backend):
    grad_b = weight.new_empty(weight.shape[0], dtype=torch.float32)
    grad_a = w_scale.new_empty(0) if a_scale is None else torch.empty_like(a_scale)
    return torch.empty_like(x), torch.empty_like(weight), grad_b, torch.empty_like(w_scale), grad_a


class QuantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, w_scale, a_scale, config, fisher):
        ctx.save_for_backward(x, weight, w_scale, a_scale)
        ctx.config, ctx.fisher, ctx.has_bias = config, fisher, bias is not None
        w_bits, a_bits, a_signed, _, _, _, backend = config
        return quant_linear_forward_op(x, weight, bias, w_scale, a_scale, w_bits, a_bits, a_signed, backend)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, w_scale, a_scale = ctx.saved_tensors
        w_bits, a_bits, a_signed, w_gf, a_gf, batch_dim, backend = ctx.config
        grad_x, grad_w, grad_b, grad_ws, grad_as = quant_linear_backward_op(
            grad_y, x, weight, w_scale, a_scale, w_bits, a_bits, a_signed, w_gf, a_gf, ctx.fisher, batch_dim,
            backend)
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
    name = backends.backend_for("quant_linear", x, backend)
    config = (w_bits, a_bits, bool(a_signed), float(w_grad_factor), float(a_grad_factor), fisher_batch_dim, name)
    return QuantLinearFunction.apply(x, weight, bias, w_scale, a_scale, config, fisher)
