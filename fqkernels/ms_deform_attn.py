"""ms_deform_attn: the core of multi-scale deformable attention (Zhu et al., 2021), forward
and backward, without materialising the samples.

    out[n, q, m*D + d] = sum_{l,p} w[n,q,m,l,p] * bilinear(value[n, start_l : start_l + H_l W_l, m, d]
                                                          viewed as [H_l, W_l], at (x, y))
    x = loc[n,q,m,l,p,0] * W_l - 0.5,   y = loc[n,q,m,l,p,1] * H_l - 0.5

(align_corners=False: 0 and 1 are the outer edges of the border pixels); a neighbour outside
the map reads zero, as F.grid_sample with padding "zeros" and the official CUDA kernel.

Backends: reference (``reference.ms_deform_attn_forward``: F.grid_sample per level, then a
weighted sum; it materialises [N*M, D, Lq, L*P] samples, which in the tiny Deformable DETR's
training step made the core ~45% of the step, measured by benchmarks/deformable_sampling_share.py)
and cpu (csrc/cpu/ms_deform_attn.cpp: one pass per output row forward; backward over (n, m)
pairs, each alone owning value[n, :, m, :]'s gradient: no atomics, and results independent of
the thread count). CUDA tensors run the reference (no CUDA kernel of this op), as do dtypes
other than float32 / float64 (bfloat16, float16) and inputs of mixed dtypes.

Double backward (the Fisher-trace regulariser differentiates gradients, create_graph=True):
the kernel's backward outputs carry no graph, so when autograd records the backward, it
recomputes the reference on the saved inputs and differentiates that with create_graph: the
second derivatives are grid_sample's, exact. Under ``traced()`` (torch.compile / export, jit
tracing for ONNX, functorch transforms) and inside ``fk.differentiable()`` the op *is* the
reference: ONNX export keeps its GridSample graph, torch.compile traces plain torch ops.
"""
import os

import torch

from fqkernels import _ext, backends, checks, composite, reference
from fqkernels.util import FunctionPair, traced

OP = "ms_deform_attn"
KERNEL_DTYPES = (torch.float32, torch.float64)
FLOAT_DTYPES = checks.FLOAT_DTYPES + (torch.float64,)  # the reference takes any float dtype


class _Cpu:
    """The C++ kernels on contiguous inputs of one dtype (float32 or float64)."""

    @staticmethod
    def forward(value, spatial_shapes, sampling_locations, attention_weights):
        n, _, m, d = value.shape
        out = value.new_empty(n, sampling_locations.shape[1], m * d)
        _ext._cpu.ms_deform_attn_forward(_ext.dl(value.contiguous()), spatial_shapes,
                                         _ext.dl(sampling_locations.contiguous()),
                                         _ext.dl(attention_weights.contiguous()), _ext.dl(out))
        return out

    @staticmethod
    def backward(grad_out, value, spatial_shapes, sampling_locations, attention_weights):
        value, locations, weights = (t.contiguous() for t in (value, sampling_locations, attention_weights))
        grads = tuple(torch.empty_like(t) for t in (value, locations, weights))
        _ext._cpu.ms_deform_attn_backward(_ext.dl(grad_out.to(value.dtype).contiguous()), _ext.dl(value),
                                          spatial_shapes, _ext.dl(locations), _ext.dl(weights),
                                          *(_ext.dl(g) for g in grads))
        return grads


backends.register(OP, "reference", FunctionPair(reference.ms_deform_attn_forward, reference.ms_deform_attn_backward))
backends.register(OP, "cpu", _Cpu())
IMPLEMENTED = ("reference", "cpu")


class MsDeformAttnFunction(torch.autograd.Function):
    """The kernel path: forward and first backward by the backend ``backend``; a recorded
    (create_graph) backward by autograd through the reference (see the module docstring)."""

    @staticmethod
    def forward(ctx, value, sampling_locations, attention_weights, spatial_shapes, backend):
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        ctx.spatial_shapes, ctx.backend = spatial_shapes, backend
        return backends.impl(OP, backend).forward(value, spatial_shapes, sampling_locations, attention_weights)

    @staticmethod
    def backward(ctx, grad_out):
        value, locations, weights = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
            grads = reference.ms_deform_attn_backward(grad_out, value, ctx.spatial_shapes, locations, weights,
                                                      create_graph=True)
        else:
            grads = backends.impl(OP, ctx.backend).backward(grad_out, value, ctx.spatial_shapes, locations, weights)
        grads = tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))
        return (*grads, None, None)


def _checked_shapes(value, spatial_shapes, sampling_locations, attention_weights):
    """spatial_shapes as [(H_l, W_l)] of Python ints, every argument checked against value."""
    checks.check_tensor(value, "value", dtypes=FLOAT_DTYPES, dim=4)
    checks.check_tensor(sampling_locations, "sampling_locations", dtypes=FLOAT_DTYPES, dim=6)
    checks.check_tensor(attention_weights, "attention_weights", dtypes=FLOAT_DTYPES, dim=5)
    for t, name in ((sampling_locations, "sampling_locations"), (attention_weights, "attention_weights")):
        checks.check_same_device(value, "value", t, name)
    n, s, m, _ = value.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f"spatial_shapes: expected positive (H, W) per level, got {shapes}")
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"spatial_shapes: {shapes} cover {sum(h * w for h, w in shapes)} positions, "
                         f"but value [N, S, M, D] has S = {s}")
    lq, points = sampling_locations.shape[1], sampling_locations.shape[4]
    expected = (n, lq, m, len(shapes), points, 2)
    if tuple(sampling_locations.shape) != expected:
        raise ValueError(f"sampling_locations: expected shape {list(expected)} ([N, Lq, M, L, P, 2] with value's "
                         f"N, M and one level per spatial shape), got {list(sampling_locations.shape)}")
    if tuple(attention_weights.shape) != expected[:-1]:
        raise ValueError(f"attention_weights: expected shape {list(expected[:-1])} ([N, Lq, M, L, P]), "
                         f"got {list(attention_weights.shape)}")
    return shapes


def _backend(value, backend):
    """The registry's choice, except that $FQ_BACKEND naming a backend without this op (triton,
    cuda) picks the reference rather than failing: a whole model then runs with FQ_BACKEND set
    for its quantization ops."""
    forced = os.environ.get("FQ_BACKEND")
    if backend is None and forced and forced not in IMPLEMENTED:
        backend = "reference"
    return backends.backend_for(OP, value, backend)


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights, backend=None):
    """The deformable attention core (module docstring).

    value [N, S, M, D]; spatial_shapes [(H_l, W_l)] * L with sum_l H_l W_l == S;
    sampling_locations [N, Lq, M, L, P, 2] (x, y); attention_weights [N, Lq, M, L, P]
    -> [N, Lq, M * D]. Float tensors on one device (float64 too: the kernels are templated,
    which gradcheck uses). backend: None (the registry's choice), "reference" or "cpu".
    """
    tensors = (value, sampling_locations, attention_weights)
    if torch.jit.is_tracing():  # ONNX export: traced sizes stay graph inputs, and no kernel can be traced
        return reference.ms_deform_attn_forward(value, spatial_shapes, sampling_locations, attention_weights)
    shapes = _checked_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    name = _backend(value, backend)
    kernel_ok = len({t.dtype for t in tensors}) == 1 and value.dtype in KERNEL_DTYPES
    if name == "reference" or not kernel_ok or traced(*tensors) or composite.active():
        return reference.ms_deform_attn_forward(value, shapes, sampling_locations, attention_weights)
    return MsDeformAttnFunction.apply(value, sampling_locations, attention_weights, shapes, name)
