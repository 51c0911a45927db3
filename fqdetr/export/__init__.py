"""Deployable artifacts of a quantized DETR: packed integer checkpoints and ONNX with
QuantizeLinear / DequantizeLinear, run with onnxruntime; any of them loaded by content
(fqdetr.export.artifact).

The ONNX names are resolved lazily: onnx and onnxruntime are the optional ``deploy`` extra
(setup.py), and packed checkpoints need neither.
"""
import importlib

from fqdetr.export.artifact import (Artifact, checkpoint_metadata, float_metadata, load_artifact, model_kind,
                                    quantized_from_state, save_quantized_checkpoint)
from fqdetr.export.packed import load_packed, save_packed

_ONNX = {"export_onnx": "fqdetr.export.onnx_export", "OnnxDetector": "fqdetr.export.onnx_runtime",
         "evaluate_onnx": "fqdetr.export.onnx_runtime", "onnx_session": "fqdetr.export.onnx_runtime"}

__all__ = sorted(["Artifact", "checkpoint_metadata", "float_metadata", "load_artifact", "load_packed", "model_kind",
                  "quantized_from_state", "save_packed", "save_quantized_checkpoint", *_ONNX])


def __getattr__(name):
    if name in _ONNX:
        return getattr(importlib.import_module(_ONNX[name]), name)
    raise AttributeError(f"module 'fqdetr.export' has no attribute {name!r}")
