"""Module swaps: ``quantize_model`` (prepare) and ``to_float`` (undo), plus switches.

    qmodel, report = quantize_model(model, QuantConfig(w_bits=4), return_report=True)
    print(report)           # what was swapped, with bits, and what was left in float

Any nn.Module works: nn.Linear, nn.Conv2d and nn.MultiheadAttention children are
replaced by their Quant* counterparts sharing the same parameters.
"""
import copy
import logging
from dataclasses import dataclass, field

from torch import nn

from fqdetr.quant.attention import QuantMultiheadAttention
from fqdetr.quant.config import QuantConfig
from fqdetr.quant.modules import QuantConv2d, QuantLinear
from fqdetr.quant.quantizer import Quantizer

log = logging.getLogger(__name__)

_SWAPS = {nn.MultiheadAttention: QuantMultiheadAttention, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
QUANT_MODULES = (QuantLinear, QuantConv2d, QuantMultiheadAttention)


@dataclass
class QuantizationReport:
    swapped: dict = field(default_factory=dict)  # name -> "QuantLinear w4a8"
    skipped: list = field(default_factory=list)  # swappable but skipped by the config
    left_float: list = field(default_factory=list)  # other modules holding parameters

    def __str__(self):
        lines = [f"quantized {len(self.swapped)} module(s):"]
        lines += [f"  {name}: {what}" for name, what in self.swapped.items()]
        lines.append(f"skipped by config: {', '.join(self.skipped) or 'none'}")
        lines.append(f"left in float (not swappable): {', '.join(self.left_float) or 'none'}")
        return "\n".join(lines)


def _swap_target(module):
    for float_type, quant_type in _SWAPS.items():
        if isinstance(module, float_type) and not isinstance(module, QUANT_MODULES):
            return quant_type
    return None


def _describe(qmodule, cfg):
    a = f"a{cfg.a_bits}" if cfg.a_bits is not None else "a-float"
    extra = f", attention products {cfg.attn_bits}-bit" if getattr(cfg, "quantize_attention", False) and \
        isinstance(qmodule, QuantMultiheadAttention) else ""
    return f"{type(qmodule).__name__} w{cfg.w_bits}{a}{extra}"


def _with_modes_of(float_module, qmodule):
    """qmodule with float_module's train/eval mode (a new module starts in training mode, which
    would turn dropout back on in an eval-mode model); its own new submodules follow it."""
    qmodule.train(float_module.training)
    float_parts = dict(float_module.named_modules())
    for name, part in qmodule.named_modules():
        if name in float_parts:
            part.train(float_parts[name].training)
    return qmodule


def _with_trainability_of(float_module, qmodule):
    """qmodule with frozen step sizes when none of float_module's parameters trains (DETR's stem
    and layer1): QAT then keeps them at their calibration, and its backward stops where the float
    model's does instead of running on through the frozen layers only to reach their scales.
    FisherCollector still reaches these layers (it makes the weights it collects require grad)."""
    if not any(p.requires_grad for p in float_module.parameters()):
        for q in qmodule.modules():
            if isinstance(q, Quantizer):
                q.scale.requires_grad_(False)
    return qmodule


def _swap_children(parent, prefix, config, report):
    # A module held under several names (Deformable DETR's shared class_embed.{i}) gets one
    # quantized copy under all of them; named_children would list it only once.
    copies = {}
    for child_name, child in list(parent._modules.items()):
        if child is None:
            continue
        if id(child) in copies:
            setattr(parent, child_name, copies[id(child)])
            continue
        name = f"{prefix}.{child_name}" if prefix else child_name
        target = _swap_target(child)
        if target is None:
            if isinstance(child, QUANT_MODULES):
                continue
            if any(True for _ in child.parameters(recurse=False)):
                report.left_float.append(name)
            _swap_children(child, name, config, report)
            continue
        layer_cfg = config.for_layer(name)
        if layer_cfg is None:
            report.skipped.append(name)
            continue
        qchild = target.from_float(child, layer_cfg)
        qchild = copies[id(child)] = _with_trainability_of(child, _with_modes_of(child, qchild))
        setattr(parent, child_name, qchild)
        report.swapped[name] = _describe(qchild, layer_cfg)


def quantize_model(model, config=None, inplace=False, return_report=False):
    """Swaps every Linear / Conv2d / MultiheadAttention of ``model`` for its quantized version.

    config: QuantConfig (defaults: w8a8). Override or skip patterns matching no swappable
    module raise ValueError (they are almost always typos). Returns the quantized model, and
    the QuantizationReport when ``return_report``.
    """
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config: expected a QuantConfig, got {type(config).__name__}")
    names = [n for n, m in model.named_modules() if _swap_target(m) is not None]
    unmatched = config.unmatched_patterns(names)
    if unmatched:
        raise ValueError(f"config: layer names/patterns {unmatched} match no Linear/Conv2d/MultiheadAttention "
                         f"module; some valid names: {names[:8]}")
    if not inplace:
        model = copy.deepcopy(model)
    report = QuantizationReport()
    _swap_children(model, "", config, report)
    log.info("quantize_model: %d module(s) quantized, %d skipped, %d float module(s) with parameters left",
             len(report.swapped), len(report.skipped), len(report.left_float))
    return (model, report) if return_report else model


def to_float(model, inplace=False):
    """Replaces every quantized module by its float counterpart (same parameters)."""
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, QUANT_MODULES):
        return model.to_float()
    copies = {}  # a module shared under several names stays shared (see _swap_children)
    for name, child in list(model._modules.items()):
        if isinstance(child, QUANT_MODULES):
            if id(child) not in copies:
                copies[id(child)] = child.to_float()
            setattr(model, name, copies[id(child)])
        elif child is not None:
            to_float(child, inplace=True)
    return model


def quantized_modules(model):
    """{name: module} of the quantized layers (the units bit allocation works on)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)}


def quantized_weights(model):
    """{name: (weight parameter, its weight Quantizer)} of every quantized layer."""
    out = {}
    for name, m in quantized_modules(model).items():
        weight = m.in_proj_weight if isinstance(m, QuantMultiheadAttention) else m.weight
        out[name] = (weight, m.weight_quantizer)
    return out


def set_fake_quant(model, enabled):
    """Turns fake quantization on or off in every quantized module (off = float forward)."""
    for m in model.modules():
        if hasattr(m, "fake_quant_enabled"):
            m.fake_quant_enabled = bool(enabled)
    return model
