"""What a user would otherwise run, as context managers over our quantized modules (the
baselines of benchmarks/bench_e2e.py): torch.ao's learnable fake-quant ops in place of
fqkernels' ops, and fqkernels' pure-PyTorch reference backend."""
import contextlib
import os
import types
from unittest import mock

import torch
import torch.nn.functional as F

import fqkernels as fk
from fqdetr.quant import attention as quant_attention
from fqdetr.quant import inference as quant_inference
from fqdetr.quant import modules as quant_modules
from fqdetr.quant import quantizer as quant_quantizer
from fqkernels import reference


def _ao_fake_quant(x, scale, bits, signed=True, axis=None, grad_factor=1.0, backend=None):
    qmin, qmax = reference.qrange(bits, bool(signed))
    zero = torch.zeros(scale.numel(), dtype=torch.float32, device=scale.device)
    if axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale.reshape(1), zero, qmin, qmax, grad_factor)
    return torch._fake_quantize_learnable_per_channel_affine(x, scale.reshape(-1), zero, axis, qmin, qmax,
                                                             grad_factor)


def _ao_quant_matmul(a, b, a_scale, b_scale, a_bits=8, b_bits=8, a_signed=True, b_signed=True, a_grad_factor=1.0,
                     b_grad_factor=1.0, backend=None):
    return torch.matmul(_ao_fake_quant(a, a_scale, a_bits, a_signed, None, a_grad_factor),
                        _ao_fake_quant(b, b_scale, b_bits, b_signed, None, b_grad_factor))


def _ao_quant_linear(x, weight, bias=None, w_scale=None, a_scale=None, w_bits=4, a_bits=8, a_signed=True,
                     fisher=None, fisher_batch_dim=0, w_grad_factor=1.0, a_grad_factor=1.0, backend=None):
    if a_bits is not None:
        x = _ao_fake_quant(x, a_scale, a_bits, a_signed, None, a_grad_factor)
    return F.linear(x, _ao_fake_quant(weight, w_scale, w_bits, True, 0, w_grad_factor), bias)


@contextlib.contextmanager
def torch_ao_ops():
    """Our quantized modules with torch's learnable fake-quant ops in place of fqkernels'
    (fake_quant, quant_linear, quant_matmul: the same layers at the same bits); everything else
    unchanged."""
    shim = types.SimpleNamespace(**{k: getattr(fk, k) for k in dir(fk) if not k.startswith("__")})
    shim.fake_quant, shim.quant_linear, shim.quant_matmul = _ao_fake_quant, _ao_quant_linear, _ao_quant_matmul
    with contextlib.ExitStack() as stack:
        for module in (quant_modules, quant_quantizer, quant_attention):
            stack.enter_context(mock.patch.object(module, "fk", shim))
        for name in ("integer_path_applies", "no_grad_needed"):  # our cached integer paths off
            stack.enter_context(mock.patch.object(quant_inference, name, lambda *args: False))
        yield


@contextlib.contextmanager
def reference_backend():
    with mock.patch.dict(os.environ, {"FQ_BACKEND": "reference"}):
        yield
