"""fqkernels: mixed-precision fake-quant and per-sample Fisher kernels for PyTorch.

    import fqkernels as fk
    y = fk.fake_quant(x, scale, bits=4, signed=True, axis=None)
    y = fk.quant_linear(x, weight, bias, w_scale=..., a_scale=..., w_bits=4, a_bits=8)
    fk.per_sample_fisher(x, grad_out, batch_dim=0)   # [out, in]: sum_n (D_n^T X_n)^2
    fk.conv2d_per_sample_fisher(x, grad_out, weight_shape, stride, padding, dilation, groups)
    y = fk.linear_with_fisher(x, weight, bias, fisher)  # backward: dW and the Fisher, one pass
    y = fk.conv2d_with_fisher(x, weight, bias, fisher, stride, padding, dilation, groups)
    y = fk.ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)  # deformable attention core

Backends: reference (pure PyTorch), cpu (C++/OpenMP), triton, cuda; see
``available_backends()`` and ``backend_for(op, tensor)``; ``FQ_BACKEND`` forces one.
"""
from fqkernels import reference
from fqkernels.backends import available_backends, backend_for
from fqkernels.composite import differentiable
from fqkernels.conv_fisher import conv2d_per_sample_fisher, conv2d_with_fisher
from fqkernels.fake_quant import fake_quant, lsq_grad_factor
from fqkernels.fisher import linear_with_fisher, per_sample_fisher, per_sample_sq_norms
from fqkernels.ms_deform_attn import ms_deform_attn
from fqkernels.quant_linear import quant_linear
from fqkernels.quant_matmul import quant_matmul

__all__ = [
    "available_backends", "backend_for", "conv2d_per_sample_fisher", "conv2d_with_fisher", "differentiable",
    "fake_quant", "linear_with_fisher", "lsq_grad_factor", "ms_deform_attn", "per_sample_fisher",
    "per_sample_sq_norms", "quant_linear", "quant_matmul", "reference",
]
