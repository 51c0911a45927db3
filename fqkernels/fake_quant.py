"""fake_quant: LSQ fake quantization, per tensor or per channel, with STE and scale gradients.

Layers: backend implementations (reference / cpu / cuda) registered in the
registry; two torch.library custom ops (forward, backward) with fake impls so
torch.compile can trace them; an autograd.Function; the public ``fake_quant``.
"""
import math
from typing import NamedTuple, Optional

import torch

from fqkernels import _ext, backends, checks, composite, reference
from fqkernels.util import FunctionPair, op_or_impl, owned_output


class _Compiled:
    """Calls fqkernels._cpu or fqkernels._cuda; inputs are made contiguous here."""

    def __init__(self, module_name):
        self.module_name = module_name

    def _module_and_stream(self, x):
        if self.module_name == "cuda":
            return _ext._cuda, {"stream": _ext.stream_of(x)}
        return _ext._cpu, {}

    def _native(self, x):
        """float16 has no CPU kernel: it runs in float32 and is rounded back, which is what the
        reference computes (float32 math, one rounding to the input dtype), so results are equal."""
        return self.module_name == "cuda" or x.dtype != torch.float16

    def forward(self, x, scale, bits, signed, axis=None):
        if not self._native(x):
            return self.forward(x.float(), scale, bits, signed, axis).to(x.dtype)
        x, scale = x.contiguous(), scale.contiguous()
        out = torch.empty_like(x)
        module, extra = self._module_and_stream(x)
        module.fake_quant_forward(_ext.dl(x), _ext.dl(scale), _ext.dl(out), bits, signed, axis, **extra)
        return out

    def backward(self, grad_y, x, scale, bits, signed, axis=None, grad_factor=1.0):
        if not self._native(x):
            grad_x, grad_scale = self.backward(grad_y.float(), x.float(), scale, bits, signed, axis, grad_factor)
            return grad_x.to(x.dtype), grad_scale
        x, scale = x.contiguous(), scale.contiguous()
        grad_y = grad_y.to(x.dtype).contiguous()
        grad_x, grad_scale = torch.empty_like(x), torch.empty_like(scale)
        module, extra = self._module_and_stream(x)
        module.fake_quant_backward(_ext.dl(grad_y), _ext.dl(x), _ext.dl(scale), _ext.dl(grad_x),
                                   _ext.dl(grad_scale), bits, signed, axis, grad_factor, **extra)
        return grad_x, grad_scale


backends.register("fake_quant", "reference",
                  FunctionPair(reference.fake_quant_forward, reference.fake_quant_backward))
backends.register("fake_quant", "cpu", _Compiled("cpu"))
backends.register("fake_quant", "cuda", _Compiled("cuda"))


def _forward(x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool, axis: Optional[int],
             backend: str) -> torch.Tensor:
    """Returns a contiguous tensor shaped like x (whatever x's strides: see util.owned_output)."""
    return owned_output(backends.impl("fake_quant", backend).forward(x, scale, bits, signed, axis))


# The ops for torch.compile / export; eager calls run _forward / _backward themselves (util.op_or_impl).
fake_quant_forward_op = torch.library.custom_op("fqkernels::fake_quant_forward", _forward, mutates_args=())


@fake_quant_forward_op.register_fake
def _(x, scale, bits, signed, axis, backend):
    return x.new_empty(x.shape)


def _backward(grad_y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool,
              axis: Optional[int], grad_factor: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_x, grad_scale), both contiguous."""
    grad_x, grad_scale = backends.impl("fake_quant", backend).backward(grad_y, x, scale, bits, signed, axis,
                                                                       grad_factor)
    return grad_x.contiguous(), grad_scale.contiguous()


fake_quant_backward_op = torch.library.custom_op("fqkernels::fake_quant_backward", _backward, mutates_args=())


@fake_quant_backward_op.register_fake
def _(grad_y, x, scale, bits, signed, axis, grad_factor, backend):
    return x.new_empty(x.shape), scale.new_empty(scale.shape, dtype=torch.float32)


class FakeQuantConfig(NamedTuple):
    """The non-tensor arguments of one fake_quant call."""
    bits: int
    signed: bool
    axis: Optional[int]
    grad_factor: float
    backend: str


class FakeQuantFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, config):
        ctx.save_for_backward(x, scale)
        ctx.config = config
        run = op_or_impl(fake_quant_forward_op, _forward, x, scale)
        return run(x, scale, config.bits, config.signed, config.axis, config.backend)

    @staticmethod
    def backward(ctx, grad_y):
        x, scale = ctx.saved_tensors
        c = ctx.config
        run = op_or_impl(fake_quant_backward_op, _backward, grad_y, x, scale)
        grad_x, grad_scale = run(grad_y, x, scale, c.bits, c.signed, c.axis, c.grad_factor, c.backend)
        return grad_x, grad_scale.reshape(scale.shape), None


def lsq_grad_factor(numel, bits, signed=True):
    """LSQ's scale-gradient factor 1 / sqrt(numel * qmax) (Esser et al., 2020)."""
    return 1.0 / math.sqrt(max(numel, 1) * reference.qrange(bits, signed)[1])


def fake_quant(x, scale, bits=4, signed=True, axis=None, grad_factor=1.0, backend=None):
    """Fake-quantizes ``x`` with learned step size ``scale``.

    x: float tensor of any shape (float32, bfloat16 or float16).
    scale: float or float tensor of 1 element (``axis=None``, per tensor) or of
        ``x.shape[axis]`` elements (per channel); finite and positive.
    bits: 2..8; signed: codes in [-2^(b-1), 2^(b-1)-1], else [0, 2^b-1].
    grad_factor: multiplies the scale gradient (see ``lsq_grad_factor``).
    Returns a tensor like ``x``; gradients flow to ``x`` (straight-through, masked
    outside the range) and to ``scale`` (LSQ).
    """
    checks.check_tensor(x, "x")
    checks.check_bits(bits)
    axis = checks.normalize_axis(axis, x)
    scale = checks.as_scale(scale, "scale", x, 1 if axis is None else x.shape[axis])
    if composite.active():
        return composite.fake_quant(x, scale, bits, bool(signed), axis, float(grad_factor))
    name = backends.backend_for("fake_quant", x, backend)
    return FakeQuantFunction.apply(x, scale, FakeQuantConfig(bits, bool(signed), axis, float(grad_factor), name))
