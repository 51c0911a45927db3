"""Twice-differentiable compositions of the ops, for double backward.

The fused ops' backward passes are kernels: their outputs carry no graph, so
``create_graph=True`` cannot differentiate through them. Inside
``with fk.differentiable():`` the public ops are instead composed from torch
primitives with the same straight-through semantics (mask on the rounded code,
LSQ scale gradient), so Hessian-vector products through the quantizers work
(Fisher-trace regularisation, Hutchinson traces). float64 is accepted here, for
finite-difference checks. Slower: use it only where second derivatives are needed.
"""
import contextlib
import threading

import torch
import torch.nn.functional as F

from fqkernels import reference

_STATE = threading.local()


@contextlib.contextmanager
def differentiable(enabled=True):
    """Routes fake_quant / quant_linear / quant_matmul through twice-differentiable compositions."""
    previous = getattr(_STATE, "on", False)
    _STATE.on = enabled
    try:
        yield
    finally:
        _STATE.on = previous


def active():
    return getattr(_STATE, "on", False)


def fake_quant(x, scale, bits, signed, axis=None, grad_factor=1.0):
    """clamp(round(x/s)) * s with d/dx = in-range mask and d/ds = LSQ, as a differentiable graph."""
    qmin, qmax = reference.qrange(bits, signed)
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s = scale.to(x.dtype).reshape(shape) if x.dim() else scale.to(x.dtype).reshape(())
    if grad_factor != 1.0:  # same value, gradient scaled by grad_factor
        s = s * grad_factor + (s - s * grad_factor).detach()
    v = x * (1.0 / s).clamp(max=torch.finfo(torch.float32).max)  # reference.inv_scale, for any dtype
    q = torch.round(v).detach()
    inside = (q >= qmin) & (q <= qmax)
    v_ste = v + (q - v).detach()  # value q; derivatives those of x / s
    return torch.where(inside, v_ste * s, q.clamp(qmin, qmax) * s)


def quant_linear(x, weight, bias, w_scale, a_scale, w_bits, a_bits, a_signed, w_grad_factor, a_grad_factor):
    xq = x if a_bits is None else fake_quant(x, a_scale, a_bits, a_signed, None, a_grad_factor)
    return F.linear(xq, fake_quant(weight, w_scale, w_bits, True, 0, w_grad_factor), bias)


def quant_matmul(a, b, a_scale, b_scale, a_bits, b_bits, a_signed, b_signed, a_grad_factor, b_grad_factor):
    return fake_quant(a, a_scale, a_bits, a_signed, None, a_grad_factor) @ \
        fake_quant(b, b_scale, b_bits, b_signed, None, b_grad_factor)
