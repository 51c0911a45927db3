"""Quantized modules, configuration, model swaps, calibration and export.

Once a model's quantizers have their scales (after one eager call or ``calibrate``), its
quantized modules trace without graph breaks: ``torch.compile(model, fullgraph=True)``
runs forward and backward, and ``torch.export`` exports the forward.

Calls that need no gradient reuse cached integer weight codes (bit-identical linears);
``set_inference_mode(model)`` also runs the convolutions in int8 (fqdetr.quant.inference).
"""
from fqdetr.quant.attention import QuantMultiheadAttention
from fqdetr.quant.calibrate import calibrate
from fqdetr.quant.config import LayerQuantConfig, QuantConfig
from fqdetr.quant.export import export_quantized, save_quantized
from fqdetr.quant.inference import clear_cache, set_inference_mode
from fqdetr.quant.modules import QuantConv2d, QuantLinear
from fqdetr.quant.quantizer import Quantizer, scale_from_data
from fqdetr.quant.swap import (QUANT_MODULES, QuantizationReport, quantize_model, quantized_modules,
                               quantized_weights,
                               set_fake_quant, to_float)

QuantSpec = LayerQuantConfig  # the per-layer spec, also public under this name

__all__ = [
    "LayerQuantConfig", "QUANT_MODULES", "QuantConfig", "QuantConv2d", "QuantLinear", "QuantMultiheadAttention",
    "QuantSpec", "QuantizationReport", "Quantizer", "calibrate", "clear_cache", "export_quantized", "quantize_model",
    "quantized_modules", "quantized_weights", "save_quantized", "scale_from_data", "set_fake_quant",
    "set_inference_mode", "to_float",
]
