"""Deployable artifacts of a quantized DETR: packed integer checkpoints and ONNX with
QuantizeLinear / DequantizeLinear, run with onnxruntime."""
from fqdetr.export.onnx_export import export_onnx
from fqdetr.export.onnx_runtime import OnnxDetector, evaluate_onnx, onnx_session
from fqdetr.export.packed import load_packed, save_packed

__all__ = ["OnnxDetector", "evaluate_onnx", "export_onnx", "load_packed", "onnx_session", "save_packed"]
