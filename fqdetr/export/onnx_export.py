"""ONNX export of a quantized DETR / Deformable DETR with QuantizeLinear / DequantizeLinear.

    export_onnx(qmodel, "model.onnx")        # inputs images [B, 3, H, W], mask [B, H, W] (bool)
                                             # outputs pred_logits [B, Q, C(+1)], pred_boxes [B, Q, 4]

Weights are integer initializers at their bit-width (int8 per output channel, int4 for
2..4 bits), each feeding a DequantizeLinear; activations are QuantizeLinear ->
DequantizeLinear pairs per tensor; everything else is float. Why this route: the model is
traced by torch.onnx's TorchScript exporter with the quantized layers in their QDQ form
(fqdetr.export.onnx_qdq), so the float part of DETR (backbone norms, masks, position
encodings, grid_sample) is translated by torch itself, and only the weights, which torch
cannot type below 8 bits, go through our own post-pass (fqdetr.export.onnx_graph). That
exporter tops out at opset 20: opset 21 (int4) is written by raising the opset of the
traced graph, whose ops opset 21 only extends with new types.

Parity with the fake-quant model (fqdetr.export.OnnxDetector runs it with onnxruntime): the
same arithmetic up to float32 rounding; QuantizeLinear computes x / s where torch computes
x * (1 / s), so a value within rounding of a code boundary can take the neighbouring code.
On a trained W4A8 DETR that moves outputs as much as 1e-6 of input noise does in torch alone
(tests/test_onnx_export.py states the tolerances and the measured noise floor).
"""
import json
import os
import tempfile
import warnings

import onnx
import torch
from torch import nn

from fqdetr.export.onnx_graph import lower_weight_markers, weight_type
from fqdetr.export.onnx_qdq import MARKER_DOMAIN, qdq_forward
from fqdetr.engine.family import family_of
from fqdetr.io import atomic_write
from fqdetr.quant import quantized_weights

MIN_OPSET, MAX_OPSET = 16, 21  # grid_sample (Deformable DETR) needs 16; int4 weights 21
_TRACER_MAX_OPSET = 20
INPUT_NAMES, OUTPUT_NAMES = ("images", "mask"), ("pred_logits", "pred_boxes")
METADATA_KEY = "fqdetr"


class DetectorOutputs(nn.Module):
    """(images [B, 3, H, W], mask [B, H, W] True on padding) -> (pred_logits, pred_boxes):
    a detector's forward with plain tensor inputs and outputs, the form ONNX graphs take."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, mask):
        out = self.model((images, mask))
        return out["pred_logits"], out["pred_boxes"]


def _dynamic_axes(dynamic_size):
    spatial = {2: "height", 3: "width"} if dynamic_size else {}
    mask_spatial = {1: "height", 2: "width"} if dynamic_size else {}
    return {"images": {0: "batch", **spatial}, "mask": {0: "batch", **mask_spatial},
            "pred_logits": {0: "batch"}, "pred_boxes": {0: "batch"}}


def _check_arguments(opset, example_size):
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset: expected an int in {MIN_OPSET}..{MAX_OPSET} (grid_sample needs "
                         f"{MIN_OPSET}, int4 weights {MAX_OPSET}), got {opset!r}")
    if not isinstance(example_size, (tuple, list)) or len(example_size) != 2 or \
            not all(isinstance(v, int) and v >= 32 for v in example_size):
        raise ValueError(f"example_size: expected (height, width), ints >= 32, got {example_size!r}")


def _traced(model, example, opset, dynamic_size, folder):
    """torch.onnx's TorchScript export of the model in its QDQ form -> (ModelProto, weight codes)."""
    raw = os.path.join(folder, "traced.onnx")
    with qdq_forward(model) as weights, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on Python shapes; dynamic axes are checked by tests
        torch.onnx.export(DetectorOutputs(model).eval(), example, raw, dynamo=False,
                          opset_version=min(opset, _TRACER_MAX_OPSET), input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), dynamic_axes=_dynamic_axes(dynamic_size),
                          custom_opsets={MARKER_DOMAIN: 1})
    return onnx.load(raw), weights


def export_onnx(model, path, *, opset=21, example_size=(128, 128), dynamic_size=True, metadata=None):
    """Writes the quantized ``model`` as ONNX to ``path`` (atomically: nothing is left at
    ``path`` when anything fails); returns the path.

    opset: 16..21; weights of 2..4 bits need 21. example_size: (H, W) of the example image
    traced. dynamic_size: batch and image size both dynamic (default), else the batch only
    (Deformable DETR's feature-map sizes are traced values while exported: fqdetr.models.
    deformable keeps them out of Python ints then). metadata: a JSON-serialisable dict (image size,
    canvas, categories: fqdetr.export.artifact.METADATA_KEYS) stored, with the detector's
    family, as the model's metadata_props entry METADATA_KEY (OnnxDetector.metadata).
    Raises ValueError naming the layer for an uncalibrated quantizer, a quantized layer
    type without a QDQ form, or a bit-width the opset cannot store.
    """
    _check_arguments(opset, example_size)
    for layer, (_, quantizer) in quantized_weights(model).items():
        weight_type(quantizer.bits, opset, layer)  # before the tracing: raises for bits the opset lacks
    device = next(model.parameters()).device
    images = torch.rand(1, 3, *example_size, device=device)
    mask = torch.zeros(1, *example_size, dtype=torch.bool, device=device)
    modes = [(module, module.training) for module in model.modules()]  # restored one by one: mixed modes stay
    try:
        with tempfile.TemporaryDirectory() as folder:
            proto, weights = _traced(model, (images, mask), opset, dynamic_size, folder)
    finally:
        for module, training in modes:
            module.training = training
    lower_weight_markers(proto, weights, opset)
    # the family picks the post-processing (DETR's softmax, Deformable DETR's sigmoids)
    stored = {**(metadata or {}), "family": family_of(model).name}
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(stored)})
    return atomic_write(path, lambda f: f.write(proto.SerializeToString()))
