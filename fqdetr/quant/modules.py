"""QuantLinear and QuantConv2d: drop-in subclasses of nn.Linear / nn.Conv2d.

They keep the float module's parameter names (``weight``, ``bias``), so a float
checkpoint loads into a quantized model and vice versa, and add
``weight_quantizer.scale`` [out] and ``input_quantizer.scale`` [1].

QuantLinear runs the fused ``fqkernels.quant_linear``. QuantConv2d fake-quantizes both
operands with the elementwise ``fqkernels.fake_quant`` kernel and then calls the
framework's convolution. Both accumulate the per-sample Fisher in their backward, from the
pass that produces the weight gradient, when a collector sets ``fisher_accumulator``.
Calls that need no gradient reuse cached weight codes and integer kernels
(fqdetr.quant.inference: linears always, bit-identical; convolutions in inference mode).
"""
import torch.nn.functional as F
from torch import nn

import fqkernels as fk
from fqkernels import reference
from fqdetr.quant import inference
from fqdetr.quant.config import LayerQuantConfig
from fqdetr.quant.quantizer import Quantizer


def samples_first(t, batch_dim):
    """[..., K] with samples along batch_dim -> [N, T, K] (a 2-D input: one token per sample)."""
    if t.dim() == 2:
        return t if batch_dim == 0 else t.t()
    return t.movedim(batch_dim, 0).reshape(t.shape[batch_dim], -1, t.shape[-1])


def float_linear_collecting(x, weight, bias, fisher, batch_dim):
    """F.linear that adds the per-sample Fisher of ``weight`` into ``fisher`` during backward
    (used while fake quantization is off); x [*, K] -> [*, M]."""
    y = F.linear(x, weight, bias)
    if y.requires_grad:
        saved = samples_first(x.detach(), batch_dim)

        def accumulate(grad):  # returns None: the gradient itself is left unchanged
            fisher.add_(fk.per_sample_fisher(saved, samples_first(grad, batch_dim), dtype=fisher.dtype))

        y.register_hook(accumulate)
    return y


def linear_with_fisher(x, batch_dim, fused):
    """Runs fused(x3, 0) on a [N, T, K] view when per-sample Fisher needs a layout quant_linear
    does not take (more than 3 dims), and restores the layout of the output."""
    if x.dim() <= 3:
        return fused(x, batch_dim)
    moved = x.movedim(batch_dim, 0)
    y = fused(moved.reshape(moved.shape[0], -1, moved.shape[-1]), 0)
    return y.reshape(*moved.shape[:-1], y.shape[-1]).movedim(0, batch_dim)


def _make_quantizers(module, config):
    module.weight_quantizer = Quantizer.for_weight(config, module.weight)
    module.input_quantizer = None
    if config.a_bits is not None:
        module.input_quantizer = Quantizer.from_config(config, config.a_bits, config.a_signed)
    module.fake_quant_enabled = True


def _rows(t, rows):
    return t[rows] if t is not None and rows is not None else t


def quantized_linear(module, x, weight, bias, input_quantizer, rows=None):
    """x Qw(W)^T + b with x fake-quantized by ``input_quantizer`` (None: left in float): the one
    linear path of the quantized modules. x [*, K] -> [*, M].

    module: a QuantLinear or QuantMultiheadAttention (its ``weight_quantizer``,
    ``fake_quant_enabled``, ``fisher_accumulator`` and ``fisher_batch_dim`` apply).
    weight [M_all, K], bias [M_all] or None; ``rows`` (a slice) picks M of the M_all output
    channels from the weight, bias, weight scales and Fisher buffer (one of the attention's
    packed q/k/v projections).
    """
    wq, fisher = module.weight_quantizer, module.fisher_accumulator
    w_grad_factor = wq.grad_factor(weight)  # of the whole weight, which the scale vector covers
    module_weight, module_bias = weight, bias  # the weight-code cache follows the parameters themselves
    weight, bias, w_scale, offset, fisher = (_rows(t, rows) for t in (weight, bias, wq.scale, wq.offset, fisher))
    if not module.fake_quant_enabled:
        if fisher is not None:
            return float_linear_collecting(x, weight, bias, fisher, module.fisher_batch_dim)
        return F.linear(x, weight, bias)
    aq = input_quantizer
    if offset is not None:  # perturbed quantized weights (fqdetr.regularize): unfused path
        w = fk.fake_quant(weight, w_scale, wq.bits, True, 0, w_grad_factor) + offset
        return F.linear(aq(x) if aq is not None else x, w, bias)
    if fisher is None and inference.integer_path_applies(x, aq, weight, bias, w_scale):
        y = inference.integer_linear(module, x, module_weight, module_bias, aq, rows)
        if y is not None:
            return y
    act = {"a_bits": None}
    if aq is not None:
        act = {"a_scale": aq.prepare(x), "a_bits": aq.bits, "a_signed": bool(aq.signed),
               "a_grad_factor": aq.grad_factor(x)}

    def fused(inp, batch_dim):
        return fk.quant_linear(inp, weight, bias, w_scale=w_scale, w_bits=wq.bits, fisher=fisher,
                               fisher_batch_dim=batch_dim, w_grad_factor=w_grad_factor, **act)

    return linear_with_fisher(x, module.fisher_batch_dim, fused) if fisher is not None else fused(x, 0)


class QuantLinear(nn.Linear):
    """nn.Linear with fake-quantized weights (per output channel) and input (per tensor).

    Input [*, in_features] -> [*, out_features]. ``fisher_accumulator`` ([out, in] float32 or
    None) and ``fisher_batch_dim`` are set by ``fqdetr.FisherCollector``.
    """

    def __init__(self, in_features, out_features, bias=True, config=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.quant_config = config or LayerQuantConfig()
        _make_quantizers(self, self.quant_config)
        self.fisher_accumulator = None
        self.fisher_batch_dim = 0

    @classmethod
    def from_float(cls, linear, config=None):
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, config,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q.weight = linear.weight
        q.bias = linear.bias
        q.weight_quantizer.init_from(q.weight)
        return q

    def to_float(self):
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def forward(self, x):
        return quantized_linear(self, x, self.weight, self.bias, self.input_quantizer)


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d with fake-quantized weights (per output channel) and input (per tensor).

    Input [batch, in_channels, H, W] -> [batch, out_channels, H', W'].
    """

    def __init__(self, *args, config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.quant_config = config or LayerQuantConfig()
        _make_quantizers(self, self.quant_config)
        self.fisher_accumulator = None  # [out, in/groups, kh, kw], set by fqdetr.FisherCollector
        self.integer_inference = False  # oneDNN int8 convolution when no gradient is needed (set_inference_mode)

    @classmethod
    def from_float(cls, conv, config=None):
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv: padding_mode {conv.padding_mode!r} is not supported (expected 'zeros')")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, config=config, device=conv.weight.device,
                dtype=conv.weight.dtype)
        q.weight, q.bias = conv.weight, conv.bias
        q.weight_quantizer.init_from(q.weight)
        return q

    def to_float(self):
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, device=self.weight.device,
                         dtype=self.weight.dtype)
        conv.weight, conv.bias = self.weight, self.bias
        return conv

    def _no_grad_forward(self, x):
        """The forward from cached weight codes when no gradient is needed (integer in inference
        mode, else the cached fake-quantized weight); None where the autograd path must run."""
        wq, aq = self.weight_quantizer, self.input_quantizer
        if not (self.fake_quant_enabled and self.fisher_accumulator is None and wq.enabled and wq._ready
                and not wq.observing and wq.offset is None
                and inference.no_grad_needed(x, self.weight, self.bias, wq.scale)):
            return None
        if self.integer_inference and inference.integer_path_applies(x, aq):
            y = inference.integer_conv(self, x)
            if y is not None:
                return y
        if aq is not None:
            x = aq(x)
        return self._conv_forward(x, inference.cached_fake_quant_weight(self, self.weight), self.bias)

    def forward(self, x):
        y = self._no_grad_forward(x)
        if y is not None:
            return y
        fisher, mask, w = self.fisher_accumulator, None, self.weight
        if self.fake_quant_enabled:
            if self.input_quantizer is not None:
                x = self.input_quantizer(x)
            wq = self.weight_quantizer
            if fisher is not None:  # the latent weight's gradient is Qw(W)'s times the STE mask
                mask = inference.cached(self, "ste_mask", (w, wq.scale), (wq.bits,), lambda: reference.ste_mask(
                    w.detach(), wq.scale.detach(), wq.bits, True, axis=0))  # weights stay fixed over a collection
            w = wq(w)
        if fisher is None:
            return self._conv_forward(x, w, self.bias)
        return fk.conv2d_with_fisher(x, w, self.bias, fisher, self.stride, self.padding, self.dilation, self.groups,
                                     fisher_mask=mask)
