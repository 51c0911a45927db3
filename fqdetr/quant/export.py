"""Export of a quantized model's integer weights: int8 codes plus float scales.

The exported dict (saved with torch.save, loadable with weights_only=True) holds,
per quantized layer, ``weight_codes`` (int8, the clamped codes; every signed
2..8-bit code fits), ``weight_scale`` [out] and the activation scale and bits, so
weights dequantize as ``codes * scale[:, None]`` exactly to the fake-quantized
weights the model computed with.
"""
import torch

from fqdetr.io import atomic_torch_save
from fqkernels import reference
from fqdetr.quant.swap import quantized_modules


def _entry(weight, wq, aq):
    codes = reference.integer_codes(weight.detach(), wq.scale.detach(), wq.bits, True, axis=0)
    entry = {"weight_codes": codes.to(torch.int8), "weight_scale": wq.scale.detach().float().clone(),
             "w_bits": wq.bits}
    if aq is not None:
        entry.update({"act_scale": aq.scale.detach().float().clone(), "a_bits": aq.bits,
                      "a_signed": bool(aq.signed)})
    return entry


def export_quantized(model):
    """{layer name: {weight_codes, weight_scale, w_bits[, act_scale, a_bits, a_signed]}}.

    Multi-head attention layers export their packed in-projection under the layer name
    (with the query input's activation scale) and their out-projection as ``name.out_proj``.
    """
    out = {}
    for name, module in quantized_modules(model).items():
        if hasattr(module, "in_proj_weight"):
            aq = module.input_quantizers[0] if len(module.input_quantizers) else None
            out[name] = _entry(module.in_proj_weight, module.weight_quantizer, aq)
        elif name.rsplit(".", 1)[-1] == "out_proj" and name.rsplit(".", 1)[0] in out:
            continue  # handled with its attention layer below
        else:
            out[name] = _entry(module.weight, module.weight_quantizer, module.input_quantizer)
    for name, module in quantized_modules(model).items():
        if hasattr(module, "in_proj_weight"):
            out[f"{name}.out_proj"] = _entry(module.out_proj.weight, module.out_proj.weight_quantizer,
                                             module.out_proj.input_quantizer)
    return out


def save_quantized(model, path):
    """Writes export_quantized(model) to ``path`` atomically (temp file + rename)."""
    atomic_torch_save(export_quantized(model), path)
