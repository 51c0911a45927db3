"""Helpers shared by the op modules (fake_quant, quant_linear, quant_matmul, fisher) and
their backends: lazy backend loading, the output contract of the custom ops, and the
C++ calls that several backends compose. Imports no op module, so that no op module
imports another."""
import functools
import importlib

import torch

from fqkernels import _ext, backends, reference


class Lazy:
    """A backend implementation imported on first use (triton is optional, slow to import,
    and TRITON_INTERPRET must be set before its kernels are defined): attribute ``name``
    of module ``module``, or the module itself when ``name`` is None."""

    def __init__(self, module, name=None):
        self.module, self.name = module, name

    def __getattr__(self, attr):
        target = importlib.import_module(self.module)
        return getattr(target if self.name is None else getattr(target, self.name), attr)


class FunctionPair:
    """A backend implementation made of two plain functions (the reference backends)."""

    def __init__(self, forward, backward):
        self.forward, self.backward = forward, backward


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensor types with no __torch_dispatch__ of their own


def traced(*tensors):
    """True when an op must go through its torch.library custom op: torch.compile / export or
    a jit trace is recording, a dispatch or function mode is active (fake tensors, make_fx),
    functorch transforms are on, or an input is a tensor subclass (a Parameter is none).
    Otherwise the op modules call the backend directly: the custom op's Python dispatch
    costs more per call (~0.3 ms for a quant_linear forward + backward, measured) than a
    small layer's GEMMs."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or bool(torch._C._len_torch_dispatch_stack())
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()
            or any(type(t) not in _PLAIN for t in tensors if t is not None))


def op_or_impl(op, impl, *tensors):
    """What an autograd.Function calls: the custom op ``op`` when ``traced(*tensors)``, else its
    implementation ``impl`` directly; while torch.profiler records, ``impl`` runs under the
    op's name, so profiles still attribute the C++ kernels' time to the op."""
    if traced(*tensors):
        return op
    if torch.autograd.profiler._is_profiler_enabled:
        return functools.partial(_labelled, f"{op._namespace}::{op._name}", impl)
    return impl


def _labelled(name, impl, *args):
    with torch.profiler.record_function(name):
        return impl(*args)


def owned_output(t):
    """``t`` as a custom op's forward output: contiguous (the fake implementations promise
    contiguous outputs, and torch.compile lays out later kernels by them) and not a view
    (an autograd.Function output that is a view of a tensor made inside it cannot be
    modified in place, as nn.Linear's output can). Copies only when ``t`` is a view or not contiguous."""
    return t.clone(memory_format=torch.contiguous_format) if t._is_view() or not t.is_contiguous() else t


def f32(t):
    """``t`` as contiguous float32 (no copy when it already is)."""
    return t.float().contiguous()


def cpu_fake_quant(x, scale, bits, signed, axis=None):
    """C++ fake quantization of a contiguous float32 tensor into a new one."""
    out = torch.empty_like(x)
    _ext._cpu.fake_quant_forward(_ext.dl(x), _ext.dl(scale), _ext.dl(out), bits, signed, axis)
    return out


def cpu_ste_backward_(grad, x, scale, bits, signed, axis, grad_factor):
    """grad <- STE-mask(grad) in place; returns the LSQ scale gradient (one C++ pass)."""
    grad_scale = torch.empty_like(scale)
    _ext._cpu.fake_quant_backward(_ext.dl(grad), _ext.dl(x), _ext.dl(scale), _ext.dl(grad), _ext.dl(grad_scale),
                                  bits, signed, axis, grad_factor)
    return grad_scale


def accumulate_fisher(fisher, xq, grad_y, weight, w_scale, w_bits, batch_dim, grad_weight=None):
    """Fisher hook of the quant_linear backends: fisher += mask_w * sum_n (D_n^T Qa(X_n))^2.

    Runs the per_sample_fisher backend the registry picks for these tensors, so the fused
    Fisher kernels are used as soon as they are registered (fqkernels/fisher.py).
    grad_weight: optional [M, K] float32 buffer that receives sum_n D_n^T Qa(X_n) from the
    same pass (the weight gradient before its STE mask: one GEMM fewer for the caller).
    The mask is the fake-quant backward of ones (one kernel pass; the reference's ste_mask
    is five tensor ops, as slow as the layer's GEMM at 128 x 128); 0/1 factors make it
    bit-identical to the reference's mask * per-sample sum."""
    quantizer = backends.impl("fake_quant", backends.backend_for("fake_quant", weight))
    mask = quantizer.backward(torch.ones_like(weight), weight, w_scale, w_bits, True, 0)[0]
    per_sample = torch.empty(fisher.shape, dtype=fisher.dtype, device=fisher.device)
    backends.impl("per_sample_fisher", backends.backend_for("per_sample_fisher", xq)).compute(
        xq, grad_y, batch_dim, per_sample, grad_weight, None, False)
    fisher.addcmul_(mask, per_sample)
