"""ONNX export with QuantizeLinear / DequantizeLinear, checked with onnxruntime on CPU."""
import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from fqdetr.data import CocoDetection, builtin_paths, make_builtin_dataset, make_transforms, max_size_for
from fqdetr.export import OnnxDetector, evaluate_onnx, export_onnx
from fqdetr.engine import evaluate_model, make_loader
from fqdetr.engine.quantize import quantize_detr
from fqdetr.engine.setup import checkpoint_geometry
from fqdetr.models import build_deformable_detr, build_detr, load_detr_checkpoint
from fqdetr.quant import QuantConfig, Quantizer, calibrate, quantize_model

# 2-, 3- and 6-bit layers beside the 4-bit default and the 8-bit first conv and heads; one layer
# with 5-bit activations (Q/DQ at 8 bits, then clipped to the 5-bit range).
ALLOCATION = {"transformer.encoder.layers.0.linear1": 3, "transformer.decoder.layers.0.self_attn": 2,
              "transformer.encoder.layers.1.linear2": {"w_bits": 6, "a_bits": 5}}


def _batch(n, height, width, pad=0):
    images = torch.rand(n, 3, height, width)
    mask = torch.zeros(n, height, width, dtype=torch.bool)
    if pad:
        mask[-1, :, width - pad:] = True  # the last image is padded on the right
    return images, mask


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    qmodel = quantize_detr(build_detr("tiny", num_classes=16).eval(), allocation=ALLOCATION, w_bits=4)
    calibrate(qmodel, [_batch(2, 64, 80, pad=16)], progress=False)
    path = tmp_path_factory.mktemp("onnx") / "detr.onnx"
    export_onnx(qmodel, path, example_size=(64, 64))
    return qmodel.eval(), path


def assert_parity(got, expected):
    """Same arithmetic up to float32 rounding (x / s in onnxruntime's QuantizeLinear, x * (1 / s) in
    torch; other summation orders): nearly every output agrees to 1e-5, and a value that lands
    on the other side of a code boundary moves what follows by about one quantization step.
    got / expected: one output dict, or lists of them (one per batch) judged together: in
    Deformable DETR such a flip moves every logit of its image (through the sampled memory), so
    the median is taken over the outputs of all batches, where flipped images are a minority."""
    got, expected = ([got], [expected]) if isinstance(got, dict) else (got, expected)
    for key in ("pred_logits", "pred_boxes"):
        assert [g[key].shape for g in got] == [e[key].shape for e in expected], key
        diff = torch.cat([(g[key] - e[key]).abs().flatten() for g, e in zip(got, expected)])
        assert diff.median() < 1e-5 and diff.max() < 0.1, (key, diff.median().item(), diff.max().item())


def test_outputs_match_the_fake_quant_model_at_any_batch_and_size(exported):
    qmodel, path = exported
    detector = OnnxDetector(path)
    # traced at 1 x 64 x 64: other batch sizes and image sizes, padded and not
    for images, mask in (_batch(2, 64, 80, pad=16), _batch(3, 96, 72), _batch(1, 48, 112, pad=30)):
        with torch.no_grad():
            expected = qmodel((images, mask))
        assert_parity(detector((images, mask)), expected)


def _initializers(path):
    model = onnx.load(path)
    return model, {i.name: i for i in model.graph.initializer}


def test_weights_are_integer_initializers_at_their_bit_width(exported):
    qmodel, path = exported
    model, inits = _initializers(path)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 21)]
    dequantized = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    layers = {}
    for node in dequantized:
        codes, scale = inits[node.input[0]], numpy_helper.to_array(inits[node.input[1]])
        layers.setdefault(node.input[0].rsplit(".", 2)[0], []).append((codes, scale, node))
    expected_bits = {name: q.weight_quantizer.bits for name, q in qmodel.named_modules()
                     if hasattr(q, "weight_quantizer")}
    assert set(layers) == set(expected_bits)
    for name, entries in layers.items():
        bits = expected_bits[name]
        for codes, scale, node in entries:
            assert codes.data_type == (TensorProto.INT4 if bits <= 4 else TensorProto.INT8), name
            values = numpy_helper.to_array(codes).astype(np.int32)
            assert values.min() >= -2 ** (bits - 1) and values.max() <= 2 ** (bits - 1) - 1, name
            axis = next(a.i for a in node.attribute if a.name == "axis")
            assert scale.shape == (values.shape[axis],) and (scale > 0).all(), name
    # the 3-bit layer reaches its own largest code (3), within int4's range (up to 7)
    codes = numpy_helper.to_array(layers["transformer.encoder.layers.0.linear1"][0][0]).astype(np.int32)
    assert codes.max() == 3
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) >= len(layers)
    assert sum(n.op_type == "Clip" for n in model.graph.node) == 1  # the 5-bit activations
    assert not any(n.domain for n in model.graph.node)


def test_opset_too_old_for_4bit_weights_leaves_nothing(exported, tmp_path):
    qmodel, _ = exported
    with pytest.raises(ValueError, match=r"^transformer\.encoder\.layers\.0\.self_attn: 4-bit weights .* needs "
                                         r"opset 21 or later \(got opset 20\)"):
        export_onnx(qmodel, tmp_path / "old.onnx", opset=20, example_size=(64, 64))
    with pytest.raises(ValueError, match="opset: expected an int in 16..21"):
        export_onnx(qmodel, tmp_path / "old.onnx", opset=15)
    assert os.listdir(tmp_path) == []


def test_8bit_model_with_quantized_attention_products_exports_at_opset_17(tmp_path):
    torch.manual_seed(0)
    config = QuantConfig(w_bits=8, quantize_attention=True)  # Q K^T and A V operands get Q/DQ pairs too
    qmodel = quantize_model(build_detr("tiny", num_classes=3, enc_layers=1, dec_layers=1).eval(), config)
    images, mask = _batch(2, 64, 64, pad=8)
    calibrate(qmodel, [(images, mask)], progress=False)
    export_onnx(qmodel, tmp_path / "w8.onnx", opset=17, example_size=(64, 64))
    model, inits = _initializers(tmp_path / "w8.onnx")
    assert model.opset_import[0].version == 17
    assert {i.data_type for n, i in inits.items() if n.endswith(".codes")} == {TensorProto.INT8}
    attention_qdq = [n.name for n in model.graph.node if n.op_type == "QuantizeLinear" and "attn/" in n.name
                     and "out_proj" not in n.name]
    # 3 attention layers (encoder self, decoder self and cross), each quantizing its 3 projection
    # inputs and the 4 operands of Q K^T and A V
    assert len(attention_qdq) == 3 * 7
    with torch.no_grad():
        expected = qmodel.eval()((images, mask))
    assert_parity(OnnxDetector(tmp_path / "w8.onnx")((images, mask)), expected)


def test_uncalibrated_model_is_refused(tmp_path):
    qmodel = quantize_detr(build_detr("tiny", num_classes=3), w_bits=4)
    with pytest.raises(ValueError, match=r"^[\w.]+\.input_quantizer: quantizer not calibrated"):
        export_onnx(qmodel, tmp_path / "q.onnx")
    assert os.listdir(tmp_path) == []


class ScaledHead(nn.Module):
    """A layer type with a quantizer that the exporter has no QDQ form for."""

    def __init__(self, head):
        super().__init__()
        self.head, self.quantizer = head, Quantizer(8)
        self.quantizer.init_from(torch.randn(10))

    def forward(self, x):
        return self.head(self.quantizer(x))


def test_unknown_quantized_layer_type_is_refused(exported, tmp_path):
    qmodel, _ = exported
    original = qmodel.class_embed
    qmodel.class_embed = ScaledHead(original)
    try:
        with pytest.raises(ValueError, match="class_embed: layer type ScaledHead has quantizers but no ONNX QDQ form"):
            export_onnx(qmodel, tmp_path / "q.onnx")
    finally:
        qmodel.class_embed = original
    assert os.listdir(tmp_path) == []


# Box refinement calls each decoder layer's box head twice per forward (in the decoder and in
# the head): one set of initializers, one DequantizeLinear per call. It is checked weight-only:
# with 8-bit activations too, a value within rounding of a code boundary takes the other code in
# onnxruntime (x / s against torch's x * (1 / s)) and moves every later value a little (measured:
# logits 7e-3 apart at one of these sizes, exact without activation quantizers); the plain
# variant keeps the activations' QDQ covered. Two-stage is exported too
# (test_two_stage_deformable_detr_exports), but not compared here: with random weights its
# encoder's class scores nearly tie, and its top-k proposals change with float rounding.
@pytest.mark.parametrize("refine, a_bits", [(False, 8), (True, None)])
def test_deformable_detr_exports_with_grid_sample_dynamic_batch_and_image_size(tmp_path, refine, a_bits):
    torch.manual_seed(0)
    float_model = build_deformable_detr("deformable_tiny", num_classes=5, with_box_refine=refine).eval()
    for head in float_model.bbox_embed:  # the preset zero-initialises the last layer: refinement would do nothing
        nn.init.normal_(head.layers[-1].weight, std=0.05)
    qmodel = quantize_model(float_model, QuantConfig(w_bits=4, a_bits=a_bits))
    calibrate(qmodel, [_batch(2, 64, 64, pad=14)], progress=False)
    qmodel.eval()
    export_onnx(qmodel, tmp_path / "deformable.onnx", example_size=(64, 64))
    model = onnx.load(tmp_path / "deformable.onnx")
    assert model.opset_import[0].version == 21 and any(n.op_type == "GridSample" for n in model.graph.node)
    uses = Counter(n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and "bbox_embed" in n.name)
    assert max(uses.values()) == (2 if refine else 1)  # refinement: one weight, two calls
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    detector = OnnxDetector(tmp_path / "deformable.onnx")
    assert detector.family_name == "deformable_detr"  # sigmoid post-processing
    # traced at 1 x 64 x 64: the feature-map sizes of other images come from the graph, not the trace
    got, expected = [], []
    for images, mask in (_batch(2, 64, 64, pad=14), _batch(3, 96, 72), _batch(1, 48, 112, pad=30)):
        with torch.no_grad():
            expected.append(qmodel((images, mask)))
        got.append(detector((images, mask)))
    assert_parity(got, expected)
    if a_bits is None:  # no activation codes to round differently: float32 rounding only
        for g, e in zip(got, expected):
            torch.testing.assert_close(g["pred_boxes"], e["pred_boxes"], rtol=0, atol=1e-5)
            torch.testing.assert_close(g["pred_logits"], e["pred_logits"], rtol=0, atol=1e-5)


def test_two_stage_deformable_detr_exports(tmp_path):
    torch.manual_seed(0)
    qmodel = quantize_model(build_deformable_detr("deformable_tiny", num_classes=5, with_box_refine=True,
                                                  two_stage=True).eval(), QuantConfig(w_bits=4))
    calibrate(qmodel, [_batch(2, 64, 64, pad=14)], progress=False)
    export_onnx(qmodel.eval(), tmp_path / "two_stage.onnx", example_size=(64, 64))
    names = [i.name for i in onnx.load(tmp_path / "two_stage.onnx").graph.initializer]
    assert len(names) == len(set(names))
    out = OnnxDetector(tmp_path / "two_stage.onnx")(_batch(3, 96, 72))
    queries = qmodel.num_queries
    assert out["pred_logits"].shape == (3, queries, 5) and out["pred_boxes"].shape == (3, queries, 4)  # sigmoid head
    assert torch.isfinite(out["pred_logits"]).all() and ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()


MODELS = Path(__file__).resolve().parent.parent / "models"


# min_ap says the model is a working detector, so that the comparison means something.
@pytest.mark.slow
@pytest.mark.parametrize("shipped, min_ap", [("detr_tiny_builtin.pth", 0.3), ("deformable_small_builtin.pth", 0.35)])
def test_shipped_model_map_matches_through_onnxruntime(tmp_path, shipped, min_ap):
    """Val mAP of each W4A8 shipped model on the 500 generated val images (the full val split of
    the built-in dataset): onnxruntime within 0.2 AP point (0.002) of torch, the issue's target.

    Measured (2026-12-05, 500 images): DETR torch 0.3633, onnxruntime 0.3616 (0.0017 apart);
    the Deformable DETR shipped on 2026-12-06 (box refinement): 0.4376 and 0.4367 (1 thread; the
    0.98 M one before it, 0.3179 and 0.3178). The export is the same arithmetic up to float32
    rounding (x / s in QuantizeLinear where torch computes x * (1 / s)); a value within rounding of
    a code boundary takes the other code, which moves a few detections, so the difference shrinks
    with more images: on 120 images it was 0.0018 (DETR) and 0.0030 (Deformable DETR), on 16
    images 0.0022 (DETR), where torch alone moved 0.011 with 1e-6 of pixel noise. AP50, coarser,
    gets 0.01."""
    make_builtin_dataset(tmp_path / "data", num_train=0, num_val=500, image_size=128, seed=0)
    path = MODELS / shipped
    size, canvas = checkpoint_geometry(path)
    val = CocoDetection(*builtin_paths(tmp_path / "data", "val"),
                        transforms=make_transforms("val", scales=(size,), max_size=max_size_for(size)))
    loader = make_loader(val, 8, canvas, shuffle=False)
    qmodel = quantize_detr(load_detr_checkpoint(path), w_bits=4, calib_loader=loader, calib_batches=1).eval()
    export_onnx(qmodel, tmp_path / "shipped.onnx", example_size=(canvas, canvas))
    torch_ap = evaluate_model(qmodel, loader)["result"]["overall"]
    onnx_ap = evaluate_onnx(tmp_path / "shipped.onnx", loader)["result"]["overall"]
    assert torch_ap["AP"] > min_ap
    assert abs(onnx_ap["AP"] - torch_ap["AP"]) < 0.002
    assert abs(onnx_ap["AP50"] - torch_ap["AP50"]) < 0.01
