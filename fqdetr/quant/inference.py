"""Integer inference of the quantized modules, and the weight-code cache it reads.

Weights are quantized once to int8 codes (per output channel) and kept with the identity,
version counter, storage and dtype of the weight and of its scale, and with the number of
optimizer steps taken (fused optimizers skip version counters); an optimizer step, a
``load_state_dict``, ``set_bits`` or any other in-place change makes the next call quantize
again, so stale codes are never used (writes through ``.data`` bypass version counters: call
``clear_cache`` after them). Activations are quantized on the fly. The integer paths run only
when no gradient is needed (``torch.no_grad()``, eval, inference); training and Fisher
passes take the fake-quant autograd path.

Linear (QuantLinear, the attention projections): automatic whenever it applies, because it
is the cpu backend's forward of ``fqkernels.quant_linear`` with the weight's codes cached
(C++ activation codes -> ``torch._int_mm`` -> C++ epilogue): bit-identical outputs.

Conv2d: with ``set_inference_mode(model, True)``, oneDNN's int8 convolution
(``torch.ops.onednn.qconv2d_pointwise``: u8 activations x s8 weights, exact int32 sums,
float32 output). The fake-quant forward is a float32 convolution of the fake-quantized
operands, so the two differ by that convolution's float32 rounding only:
|y_int - y_fq| <= CONV_RTOL * conv(|Qa(x)|, |Qw(W)|) elementwise (tests/test_inference_mode.py).
Without inference mode, a no-grad conv reuses its cached fake-quantized weight (bit-identical).
"""
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import fqkernels as fk
from fqkernels import _ext, reference

CONV_RTOL = 2.0 ** -19  # a float32 sum of a few thousand products: well below this, relative to sum |terms|


def _identity(t):
    return (weakref.ref(t), t._version, t.data_ptr(), t.dtype, tuple(t.shape))


def _same(key, t):
    ref, version, ptr, dtype, shape = key
    return ref() is t and (version, ptr, dtype, tuple(shape)) == (t._version, t.data_ptr(), t.dtype, tuple(t.shape))


# module -> {slot: (tensor keys, extra, optimizer steps, value)}; outside the modules so that
# they still pickle and deep-copy as before, and an entry goes when its module does.
_CACHE = weakref.WeakKeyDictionary()
# Optimizer steps taken in this process: fused optimizers (AdamW(fused=True) on the CPU) write
# parameters without bumping their version counters, so any step invalidates every entry.
_OPTIMIZER_STEPS = [0]


def _count_step(optimizer, args, kwargs):
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


def _recording():
    """True while torch.jit tracing (ONNX export) or torch.compile / torch.export records ops."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def cached(module, slot, tensors, extra, build):
    """build() for ``module``, reused until a tensor of ``tensors`` changes (identity, version,
    storage, dtype or shape) or ``extra`` (bits, activation scale...) differs. ``slot`` names
    the entry (one module may hold several: the attention's q/k/v rows). Tracing and compiling
    record build() itself."""
    if _recording():
        return build()
    cache = _CACHE.setdefault(module, {})
    entry = cache.get(slot)
    if entry is not None and entry[1:3] == (extra, _OPTIMIZER_STEPS[0]) and \
            all(_same(k, t) for k, t in zip(entry[0], tensors)):
        return entry[3]
    value = build()
    cache[slot] = ([_identity(t) for t in tensors], extra, _OPTIMIZER_STEPS[0], value)
    return value


def clear_cache(model):
    """Drops every cached weight code of ``model``'s modules (they rebuild on the next call).
    Needed only after writes that bypass version counters (``weight.data.copy_(...)``)."""
    for m in model.modules():
        _CACHE.pop(m, None)


def no_grad_needed(*tensors):
    """True when a call on ``tensors`` needs no autograd graph, outside tracing and compiling
    (which record the fake-quant ops: ONNX export, torch.compile, torch.export)."""
    if _recording():
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def integer_path_applies(x, aq, *params):
    """True when a quantized layer with activation quantizer ``aq`` may run its integer path
    on ``x``: CPU float32 input, cpu backend, scales set, nothing observing, no gradient."""
    return (no_grad_needed(x, *params) and aq is not None and aq.enabled and aq._ready and not aq.observing
            and x.dtype == torch.float32 and x.device.type == "cpu" and _ext._cpu is not None
            and not fk.composite.active() and fk.backend_for("quant_linear", x) == "cpu")


def _linear_codes(weight, w_scale, bits):
    """(codes_t [K, M] int8, row_sums [M] int32), or None when the weight holds NaN or K is
    too long for exact int32 sums (the caller then takes the ordinary path)."""
    w, s = weight.detach().float().contiguous(), w_scale.detach().float().reshape(-1).contiguous()
    if w.shape[1] > _ext._cpu.MAX_EXACT_K or not w.numel():
        return None
    codes_t = torch.empty(w.shape[1], w.shape[0], dtype=torch.int8)
    row_sums = torch.empty(w.shape[0], dtype=torch.int32)
    if _ext._cpu.quant_weight_codes_t(_ext.dl(w), _ext.dl(s), _ext.dl(codes_t), _ext.dl(row_sums), bits):
        return None
    return codes_t, row_sums, s


def _activation_codes(x, aq):
    """int8 codes of x (float32, any shape), as fqkernels' cpu backend stores them (unsigned
    8-bit codes shifted by -128), in x's memory layout, or None when x holds NaN. A
    channels-last feature map (oneDNN's convolutions return them) is not copied to NCHW:
    the copies took 60% of DETR-R50's integer forward."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    dense = x.permute(0, 2, 3, 1) if channels_last else x.contiguous()
    codes = torch.empty(dense.shape, dtype=torch.int8)
    if x.numel() and _ext._cpu.quant_act_codes(_ext.dl(dense), _ext.dl(aq.scale.detach().reshape(1)),
                                               _ext.dl(codes), aq.bits, bool(aq.signed)):
        return None
    return codes.permute(0, 3, 1, 2) if channels_last else codes


def integer_linear(module, x, weight, bias, aq, rows=None):
    """x Qw(W)^T + b with x quantized by ``aq``, from cached weight codes; x [*, K] -> [*, M].

    weight [M_all, K] and bias [M_all] are the module's own parameters (the cache follows
    them); ``rows`` (a slice) picks M of the M_all output channels, as in
    fqdetr.quant.modules.quantized_linear. Returns None where the ordinary path must run
    (NaN, empty input, K too long)."""
    wq = module.weight_quantizer
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    slot = "linear" if rows is None else f"linear {rows.start}:{rows.stop}"
    codes = cached(module, slot, (weight, wq.scale), (wq.bits,),
                   lambda: _linear_codes(pick(weight), pick(wq.scale), wq.bits))
    x2 = x.reshape(-1, x.shape[-1])
    if codes is None or not x2.shape[0]:
        return None
    x_codes = _activation_codes(x2, aq)
    if x_codes is None:
        return None
    codes_t, row_sums, s = codes
    y = torch.empty(x2.shape[0], codes_t.shape[1], dtype=torch.float32)
    acc = torch._int_mm(x_codes, codes_t, out=y.view(torch.int32))
    b = None if bias is None else _ext.dl(pick(bias).detach().float().contiguous())
    _ext._cpu.int_accum_epilogue(_ext.dl(acc), _ext.dl(aq.scale.detach().reshape(1)), _ext.dl(s),
                                 _ext.dl(row_sums), b, aq.bits, bool(aq.signed))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _conv_zero_point(aq):
    """oneDNN's u8 zero point for the activation codes: codes + 128 for every range whose int8
    storage is unshifted, the codes themselves for unsigned 8 bit (stored as code - 128)."""
    return 0 if reference.qrange(aq.bits, bool(aq.signed))[1] > 127 else 128


def _packed_conv_weight(conv, x_scale, zero_point):
    wq = conv.weight_quantizer
    w, s = conv.weight.detach().float(), wq.scale.detach().float().reshape(-1).contiguous()
    codes = reference.integer_codes(w, s, wq.bits, True, axis=0).to(torch.int8)
    packed = torch.ops.onednn.qconv_prepack(codes, s, x_scale, zero_point, list(conv.stride), list(conv.padding),
                                            list(conv.dilation), conv.groups, None)
    return packed, s, torch.zeros(s.numel(), dtype=torch.int64)


# Longest exact reduction of u8 x s8 products (at most 255 * 128 each) in an int32 accumulator.
_MAX_CONV_K = (1 << 31) // (255 * 128) - 1


def integer_conv(conv, x):
    """oneDNN int8 convolution of ``conv`` (a QuantConv2d with activation quantizer) on x
    [N, C, H, W] float32 -> [N, O, H', W'] float32 (channels-last memory). None where the
    ordinary path must run (NaN in x, empty input, string padding, a reduction too long for
    exact int32 sums)."""
    aq = conv.input_quantizer
    if not x.numel() or isinstance(conv.padding, str) or conv.weight[0].numel() > _MAX_CONV_K:
        return None
    codes = _activation_codes(x, aq)
    if codes is None:
        return None
    x_scale, zero_point = float(aq.scale), _conv_zero_point(aq)
    packed, s, w_zero = cached(conv, "conv", (conv.weight, conv.weight_quantizer.scale, aq.scale),
                               (conv.weight_quantizer.bits, x_scale, zero_point),
                               lambda: _packed_conv_weight(conv, x_scale, zero_point))
    qx = codes.view(torch.uint8).bitwise_xor_(0x80)  # int8 storage -> oneDNN's u8 with zero_point
    bias = None if conv.bias is None else conv.bias.detach().float()
    return torch.ops.onednn.qconv2d_pointwise(qx, x_scale, zero_point, packed, s, w_zero, bias, list(conv.stride),
                                              list(conv.padding), list(conv.dilation), conv.groups, 1.0, 0,
                                              torch.float32, "none", [], "")


def cached_fake_quant_weight(module, weight):
    """Qw(W) of ``module``'s weight, computed once per weight/scale version (no-grad calls)."""
    wq = module.weight_quantizer
    return cached(module, "fake_quant_weight", (weight, wq.scale), (wq.bits,),
                  lambda: fk.fake_quant(weight.detach(), wq.scale.detach(), wq.bits, True, 0))


def set_inference_mode(model, enabled=True):
    """Turns the integer convolutions of ``model``'s QuantConv2d layers on or off (linears take
    their integer path whenever no gradient is needed, see the module docstring). Returns model."""
    for m in model.modules():
        if hasattr(m, "integer_inference"):
            m.integer_inference = bool(enabled)
    return model
