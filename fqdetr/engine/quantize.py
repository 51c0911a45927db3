"""Quantizing a DETR for the method: its default config, applying a bit allocation,
calibration on a loader, and the layer sizes / weights the allocation needs."""
import numbers

import torch

import fqkernels as fk
from fqdetr.quant import QuantConfig, calibrate, quantize_model, quantized_modules, quantized_weights

# METHOD.md section 5: the first convolution and the prediction heads stay at 8 bits.
EIGHT_BIT_LAYERS = ("backbone.0.body.conv1", "class_embed", "bbox_embed.*")


def detr_quant_config(w_bits=4, a_bits=8, **kwargs):
    """QuantConfig for DETR: ``w_bits`` everywhere except the first conv and the heads (8 bit)."""
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, layers={p: {"w_bits": 8} for p in EIGHT_BIT_LAYERS},
                       **kwargs)


def fixed_bounds(model):
    """{layer: (8, 8)} for the layers METHOD.md keeps at 8 bits."""
    import fnmatch

    return {n: (8, 8) for n in quantized_modules(model)
            if any(fnmatch.fnmatchcase(n, p) for p in EIGHT_BIT_LAYERS)}


def layer_weights(model):
    """{layer: weight tensor} of the quantized layers (MHA: the packed in-projection)."""
    return {n: w for n, (w, _) in quantized_weights(model).items()}


@torch.no_grad()
def apply_allocation(model, allocation):
    """Sets each layer's weight bits ({layer: bits} or {layer: {"w_bits": b}}) and re-derives
    its weight scale from the weights at the new bit-width."""
    if not isinstance(allocation, dict):
        raise ValueError(f"allocation: expected a mapping {{layer: bits}}, got {type(allocation).__name__}")
    weights = quantized_weights(model)
    unknown = set(allocation) - set(weights)
    if unknown:
        raise ValueError(f"allocation: unknown layers {sorted(unknown)}")
    for name, bits in allocation.items():
        bits = bits.get("w_bits") if isinstance(bits, dict) else bits
        bits = int(bits) if isinstance(bits, numbers.Integral) and not isinstance(bits, bool) else bits
        fk.checks.check_bits(bits, f"allocation[{name!r}]")  # numpy ints pass, 4.5 / "4" / 12 do not
        weight, quantizer = weights[name]
        quantizer.bits = int(bits)
        quantizer.init_from(weight)
    return model


def quantize_detr(model, allocation=None, w_bits=4, a_bits=8, calib_loader=None, calib_batches=4):
    """A quantized copy of ``model`` (uniform ``w_bits`` or ``allocation``), activation scales
    calibrated on ``calib_batches`` batches of ``calib_loader`` when given."""
    qmodel = quantize_model(model, detr_quant_config(w_bits, a_bits))
    if allocation:
        apply_allocation(qmodel, allocation)
    if calib_loader is not None:
        calibrate(qmodel, ((images, mask) for images, mask, _ in calib_loader), num_batches=calib_batches,
                  progress=False)
    return qmodel
