"""fqdetr: Fisher-aware quantization for DETR detectors with critical-category objectives.

Public names are resolved lazily so that importing one sub-package (say
``fqdetr.models``) does not pull in the compiled kernels.
"""
import importlib

_PUBLIC = {
    "QuantConfig": "fqdetr.quant",
    "QuantSpec": "fqdetr.quant",
    "quantize_model": "fqdetr.quant",
    "QuantLinear": "fqdetr.quant",
    "QuantConv2d": "fqdetr.quant",
    "QuantMultiheadAttention": "fqdetr.quant",
    "FisherCollector": "fqdetr.fisher",
    "critical_transform": "fqdetr.critical",
    "allocate_bits": "fqdetr.allocate",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fqdetr' has no attribute {name!r}")
