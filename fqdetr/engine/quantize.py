"""Quantizing a DETR or a Deformable DETR for the method: its default config, applying a bit
allocation, calibration on a loader, and the layer sizes / weights the allocation needs."""
import fnmatch
import numbers

import torch

import fqkernels as fk
from fqdetr.engine.family import FAMILIES, DETR, family_of
from fqdetr.quant import QuantConfig, calibrate, quantize_model, quantized_modules, quantized_weights


def detr_quant_config(w_bits=4, a_bits=8, eight_bit_layers=FAMILIES[DETR].eight_bit_layers, **kwargs):
    """QuantConfig: ``w_bits`` everywhere except the ``eight_bit_layers`` patterns (default DETR's
    first conv and heads; a model's own: fqdetr.engine.family.family_of(model).eight_bit_layers),
    which get 8 bits (docs/METHOD.md section 5.4). Input projections' convolutions are swapped
    like any other; normalisation layers (Deformable DETR's GroupNorm) stay float."""
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, layers={p: {"w_bits": 8} for p in eight_bit_layers},
                       **kwargs)


def fixed_bounds(model):
    """{layer: (8, 8)} for the layers of ``model``'s family kept at 8 bits (docs/METHOD.md section 5.4)."""
    patterns = family_of(model).eight_bit_layers
    return {n: (8, 8) for n in quantized_modules(model) if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def layer_weights(model):
    """{layer: weight tensor} of the quantized layers (MHA: the packed in-projection)."""
    return {n: w for n, (w, _) in quantized_weights(model).items()}


def _bits_value(value, what):
    """``value`` as a checked bit-width (numpy ints pass; 4.5, "4", 12 do not)."""
    value = int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    fk.checks.check_bits(value, what)
    return value


def allocation_layers(allocation):
    """{layer: {"w_bits": b[, "a_bits": a]}} with checked bits from an allocation: {layer: w_bits}
    or {layer: {"w_bits": b, "a_bits": a}} (what ``fqdetr allocate`` writes)."""
    if not isinstance(allocation, dict):
        raise ValueError(f"allocation: expected a mapping {{layer: bits}}, got {type(allocation).__name__}")
    layers = {}
    for name, entry in allocation.items():
        entry = entry if isinstance(entry, dict) else {"w_bits": entry}
        if "w_bits" not in entry or set(entry) - {"w_bits", "a_bits"}:
            raise ValueError(f"allocation[{name!r}]: expected w_bits and optionally a_bits, got {sorted(entry)}")
        layers[name] = {key: _bits_value(value, f"allocation[{name!r}]") for key, value in entry.items()}
    return layers


def _input_quantizers(module):
    """The activation quantizers of a quantized layer (attention: one per q, k, v projection)."""
    if hasattr(module, "input_quantizers"):
        return list(module.input_quantizers)
    return [module.input_quantizer] if module.input_quantizer is not None else []


@torch.no_grad()
def apply_allocation(model, allocation):
    """Sets each layer's weight bits, re-deriving its weight scale at the new bit-width, and its
    activation bits where the allocation gives a_bits (allocation_layers' forms). Applied to the
    quantized modules themselves, so an attention's out_proj takes its own entry."""
    layers = allocation_layers(allocation)
    modules = quantized_modules(model)
    unknown = set(layers) - set(modules)
    if unknown:
        raise ValueError(f"allocation: unknown layers {sorted(unknown)}")
    weights = quantized_weights(model)
    for name, bits in layers.items():
        weight, quantizer = weights[name]
        quantizer.bits = bits["w_bits"]
        quantizer.init_from(weight)
        if "a_bits" in bits:
            activation = _input_quantizers(modules[name])
            if not activation:
                raise ValueError(f"allocation[{name!r}]: a_bits given for a layer with float activations")
            for q in activation:
                q.set_bits(bits["a_bits"])
    return model


def quantize_detr(model, allocation=None, w_bits=4, a_bits=8, calib_loader=None, calib_batches=4):
    """A quantized copy of ``model`` (uniform ``w_bits`` / ``a_bits``, then per layer as
    ``allocation`` gives them), activation scales calibrated on ``calib_batches`` batches of
    ``calib_loader`` when given."""
    qmodel = quantize_model(model, detr_quant_config(w_bits, a_bits, family_of(model).eight_bit_layers))
    if allocation is not None:
        apply_allocation(qmodel, allocation)
    if calib_loader is not None:
        calibrate(qmodel, ((images, mask) for images, mask, _ in calib_loader), num_batches=calib_batches,
                  progress=False)
    return qmodel
