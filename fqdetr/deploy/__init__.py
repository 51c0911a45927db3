"""Deployable artifacts of a quantized DETR: packed integer checkpoints and ONNX with
QuantizeLinear / DequantizeLinear, run with onnxruntime."""
from fqdetr.deploy.onnx_export import export_onnx
from fqdetr.deploy.onnx_runtime import OnnxDetector, evaluate_onnx, onnx_session
from fqdetr.deploy.packed import load_packed, save_packed

__all__ = ["OnnxDetector", "evaluate_onnx", "export_onnx", "load_packed", "onnx_session", "save_packed"]
