"""Running an exported detector with onnxruntime (CPU) like a torch model.

    detector = OnnxDetector("model.onnx")
    out = detector((images, mask))            # {"pred_logits", "pred_boxes"} tensors
    evaluate_onnx("model.onnx", val_loader)   # what fqdetr.engine.evaluate_model gives a torch model
"""
import json
import os

import torch
from torch import nn

from fqdetr.engine.family import DETR
from fqdetr.export.onnx_export import INPUT_NAMES, METADATA_KEY, OUTPUT_NAMES


def onnx_session(path, threads=None):
    """An onnxruntime CPU InferenceSession of ``path``.

    onnxruntime fuses a dequantized weight feeding a MatMul into MatMulNBits, whose default
    accuracy level quantizes the activations too; level 0 keeps them in float, the
    arithmetic of the exported model (and of the torch model it came from).
    """
    import onnxruntime as ort

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
        raise ValueError(f"{path}: onnxruntime cannot load it ({type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0][:200]})") from err


class OnnxDetector(nn.Module):
    """An exported detector behind a DETR's call signature: forward((images [B, 3, H, W],
    mask [B, H, W])) -> {"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4]} (CPU tensors), so
    torch-side evaluation code runs it unchanged. ``metadata``: the dict export_onnx stored
    (image size, canvas, categories, family); ``family_name``: the detector family, which picks
    the post-processing."""

    def __init__(self, path, threads=None):
        super().__init__()
        self.session = onnx_session(path, threads)
        names = tuple(i.name for i in self.session.get_inputs())
        if names != INPUT_NAMES:
            raise ValueError(f"{path}: expected ONNX inputs {INPUT_NAMES} (fqdetr.export.export_onnx), got {names}")
        stored = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.metadata = json.loads(stored) if stored else {}
        self.family_name = self.metadata.get("family", DETR)  # fqdetr.engine.family.family_of reads it

    def forward(self, samples):
        images, mask = samples
        feeds = {"images": images.detach().float().cpu().numpy(), "mask": mask.detach().bool().cpu().numpy()}
        outputs = self.session.run(list(OUTPUT_NAMES), feeds)
        return {name: torch.from_numpy(value) for name, value in zip(OUTPUT_NAMES, outputs)}


def evaluate_onnx(path, loader, threads=None, **kwargs):
    """fqdetr.engine.evaluate_model of the ONNX model at ``path`` over ``loader`` (same
    post-processing and COCO evaluation as for a torch model; kwargs go through)."""
    from fqdetr.engine.evaluate import evaluate_model

    return evaluate_model(OnnxDetector(path, threads), loader, **kwargs)
