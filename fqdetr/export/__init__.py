"""Deployable artifacts of a quantized DETR: packed integer checkpoints and ONNX with
QuantizeLinear / DequantizeLinear, run with onnxruntime; any of them loaded by content
(fqdetr.export.artifact)."""
from fqdetr.export.artifact import (Artifact, checkpoint_metadata, float_metadata, load_artifact, model_kind,
                                    quantized_from_state, save_quantized_checkpoint)
from fqdetr.export.onnx_export import export_onnx
from fqdetr.export.onnx_runtime import OnnxDetector, evaluate_onnx, onnx_session
from fqdetr.export.packed import load_packed, save_packed

__all__ = ["Artifact", "OnnxDetector", "checkpoint_metadata", "evaluate_onnx", "export_onnx", "float_metadata",
           "load_artifact", "load_packed", "model_kind", "onnx_session", "quantized_from_state", "save_packed",
           "save_quantized_checkpoint"]
