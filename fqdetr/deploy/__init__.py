"""Deployable artifacts of a quantized DETR: packed integer checkpoints and ONNX with
QuantizeLinear / DequantizeLinear."""
from fqdetr.deploy.packed import load_packed, save_packed

__all__ = ["load_packed", "save_packed"]
