"""The quantized layers' forward as traceable float ops plus QDQ markers, for torch.onnx.

While ``qdq_forward(model)`` is active, every QuantLinear / QuantConv2d /
QuantMultiheadAttention computes with its fake-quantized weight (the same values
as its own forward) taken from a ``WeightMarker`` and its fake-quantized
activations from an ``ActivationQDQ``. Traced by torch.onnx's TorchScript exporter:

- ActivationQDQ emits QuantizeLinear -> DequantizeLinear per tensor with an int8 / uint8
  zero point, and a Clip to the code range below 8 bits (the ONNX types hold 8 bits);
- WeightMarker emits a placeholder ``fqdetr::QuantWeight`` node that
  ``fqdetr.export.onnx_graph`` replaces by integer initializers at the weight's bit-width
  and a DequantizeLinear: torch's exporter has no integer types below 8 bits.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fqdetr.quant import QuantConv2d, QuantLinear, QuantMultiheadAttention, Quantizer
from fqkernels import reference

MARKER_DOMAIN = "fqdetr"


@dataclass
class WeightCodes:
    """One exported weight: integer ``codes`` (int32, the layout the graph uses), ``scale``
    float32 [channels] along ``axis``, and ``bits``."""

    layer: str
    codes: torch.Tensor
    scale: torch.Tensor
    axis: int
    bits: int


class WeightMarker(torch.autograd.Function):
    """forward(weight, dequantized, key): ``dequantized``; exports as fqdetr::QuantWeight(key)."""

    @staticmethod
    def forward(ctx, weight, dequantized, key):
        return dequantized.clone()

    @staticmethod
    def symbolic(g, weight, dequantized, key):
        return g.op(f"{MARKER_DOMAIN}::QuantWeight", key_s=key).setType(dequantized.type())


class ActivationQDQ(torch.autograd.Function):
    """forward(x, scale, bits, signed): per-tensor fake quantization of x (float scale)."""

    @staticmethod
    def forward(ctx, x, scale, bits, signed):
        return reference.fake_quant_forward(x, torch.tensor([scale]), bits, signed)

    @staticmethod
    def symbolic(g, x, scale, bits, signed):
        qmin, qmax = reference.qrange(bits, signed)
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8 if signed else torch.uint8))
        y = g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, zero), s, zero)
        if bits == 8:
            return y
        bounds = (g.op("Constant", value_t=torch.tensor(v * scale, dtype=torch.float32)) for v in (qmin, qmax))
        return g.op("Clip", y, *bounds)


def _activation(quantizer, x):
    """x through an activation quantizer's QDQ form (unchanged without an enabled quantizer)."""
    if quantizer is None or not quantizer.enabled:
        return x
    return ActivationQDQ.apply(x, float(quantizer.scale.item()), quantizer.bits, bool(quantizer.signed))


class _Weights:
    """The WeightCodes of one export, by marker key."""

    def __init__(self):
        self.codes = {}

    def marked(self, layer, weight, quantizer, rows=slice(None), transpose=False):
        """A function giving the fake-quantized ``weight[rows]`` (transposed to [in, out] for a
        MatMul) through a WeightMarker; called inside the traced forward, so the marker is traced."""
        scale = quantizer.scale.detach().float()[rows]
        codes = reference.integer_codes(weight.detach()[rows].float(), scale, quantizer.bits, True, axis=0)
        dequantized = (codes.float() * scale.reshape([-1] + [1] * (codes.dim() - 1))).to(weight.dtype)
        if transpose:
            codes, dequantized = codes.t(), dequantized.t()
        key = f"{layer}.{len(self.codes)}"
        self.codes[key] = WeightCodes(layer, codes.contiguous(), scale.clone(), int(transpose), quantizer.bits)
        return lambda: WeightMarker.apply(weight, dequantized, key)


def _linear_forward(module, name, weights):
    weight_t = weights.marked(name, module.weight, module.weight_quantizer, transpose=True)

    def forward(x):
        y = torch.matmul(_activation(module.input_quantizer, x), weight_t())
        return y if module.bias is None else y + module.bias

    return {"forward": forward}


def _conv_forward(module, name, weights):
    weight = weights.marked(name, module.weight, module.weight_quantizer)
    return {"forward": lambda x: module._conv_forward(_activation(module.input_quantizer, x), weight(), module.bias)}


def _attention_forward(module, name, weights):
    """_project and _product of a QuantMultiheadAttention (its out_proj is a QuantLinear)."""
    e = module.embed_dim
    projections = [weights.marked(name, module.in_proj_weight, module.weight_quantizer, slice(i * e, (i + 1) * e),
                                  transpose=True) for i in range(3)]
    bias = module.in_proj_bias

    def project(x, i):
        aq = module.input_quantizers[i] if len(module.input_quantizers) else None
        y = torch.matmul(_activation(aq, x), projections[i]())
        return y if bias is None else y + bias[i * e:(i + 1) * e]

    def product(a, b, name_a, name_b):
        quantizers = module.product_quantizers
        if len(quantizers):
            a, b = _activation(quantizers[name_a], a), _activation(quantizers[name_b], b)
        return torch.bmm(a, b)

    return {"_project": project, "_product": product}


_FORWARDS = {QuantLinear: _linear_forward, QuantConv2d: _conv_forward, QuantMultiheadAttention: _attention_forward}


def _owner(modules, quantizer_name):
    """Name of the layer a quantizer belongs to (past a ModuleList / ModuleDict holding it)."""
    owner = quantizer_name.rpartition(".")[0]
    if isinstance(modules.get(owner), (nn.ModuleList, nn.ModuleDict)):
        owner = owner.rpartition(".")[0]
    return owner


def check_exportable(model):
    """ValueError naming the layer when a quantizer sits in a layer type without a QDQ form or
    was never calibrated (an activation scale would come from the export's example input)."""
    modules = dict(model.named_modules())
    for name, quantizer in modules.items():
        if not isinstance(quantizer, Quantizer):
            continue
        owner = _owner(modules, name)
        if type(modules[owner]) not in _FORWARDS:
            raise ValueError(f"{owner or 'model'}: layer type {type(modules[owner]).__name__} has quantizers "
                             f"but no ONNX QDQ form (known: {', '.join(t.__name__ for t in _FORWARDS)})")
        if quantizer.enabled and not bool(quantizer.initialized):
            raise ValueError(f"{name}: quantizer not calibrated (run fqdetr.quant.calibrate on the model "
                             f"before exporting)")


def _without_extra_state(module, state_dict, prefix, local_metadata):
    """State dict hook: the tracer reads every state dict entry as a tensor, and a quantizer's
    extra state (bits, signed) is a dict."""
    state_dict.pop(f"{prefix}_extra_state", None)


@contextlib.contextmanager
def qdq_forward(model):
    """Within the block the model's quantized layers run their QDQ form; yields the
    {marker key: WeightCodes} the markers stand for."""
    check_exportable(model)
    weights, patched = _Weights(), []
    hooks = [q._register_state_dict_hook(_without_extra_state) for q in model.modules() if isinstance(q, Quantizer)]
    try:
        for name, module in model.named_modules():
            if type(module) in _FORWARDS and module.fake_quant_enabled:
                for attr, fn in _FORWARDS[type(module)](module, name, weights).items():
                    setattr(module, attr, fn)
                    patched.append((module, attr))
        yield weights.codes
    finally:
        for module, attr in patched:
            delattr(module, attr)
        for hook in hooks:
            hook.remove()
