"""Post-pass over the exported ONNX graph: each ``fqdetr::QuantWeight`` placeholder becomes
integer initializers at the weight's bit-width and a per-channel DequantizeLinear.

Codes of 5..8-bit weights are stored as int8, of 2..4-bit weights as int4 (ONNX's
smallest integer type, opset 21 or later); a 2- or 3-bit weight uses only its own
code range of the type. Zero points are 0 (symmetric codes, docs/METHOD.md section 5).
"""
from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fqdetr.export.onnx_qdq import MARKER_DOMAIN

INT4_MIN_OPSET = 21


def weight_type(bits, opset, layer):
    """The ONNX integer type of ``bits``-bit weight codes at ``opset``."""
    if bits > 4:
        return TensorProto.INT8
    if opset < INT4_MIN_OPSET:
        raise ValueError(f"{layer}: {bits}-bit weights are stored as int4, which needs opset "
                         f"{INT4_MIN_OPSET} or later (got opset {opset})")
    return TensorProto.INT4


def _integer_tensor(name, dtype, codes):
    """codes (int32 tensor) as an ONNX tensor of ``dtype`` (int8 raw, int4 packed two a byte)."""
    if dtype == TensorProto.INT8:
        return numpy_helper.from_array(codes.numpy().astype(np.int8), name)
    return helper.make_tensor(name, dtype, list(codes.shape), codes.reshape(-1).tolist())


def _dequantize_node(node, weight, opset, graph, use):
    """The DequantizeLinear replacing placeholder ``node``, the ``use``-th placeholder of its
    weight; the first adds the weight's initializers to ``graph``. A layer called more than once
    per forward leaves one placeholder per call (box refinement calls each decoder layer's
    bbox_embed in the decoder and in the head): they share one set of initializers."""
    key = node.attribute[0].s.decode()
    dtype = weight_type(weight.bits, opset, weight.layer)
    if use == 0:
        graph.initializer.extend([
            _integer_tensor(f"{key}.codes", dtype, weight.codes),
            numpy_helper.from_array(weight.scale.numpy().astype(np.float32), f"{key}.scale"),
            _integer_tensor(f"{key}.zero_point", dtype, weight.codes.new_zeros(weight.scale.numel())),
        ])
    name = f"{key}.DequantizeLinear" + (f".{use}" if use else "")
    return helper.make_node("DequantizeLinear", [f"{key}.codes", f"{key}.scale", f"{key}.zero_point"],
                            list(node.output), name=name, axis=weight.axis)


def lower_weight_markers(model, weights, opset):
    """Replaces the placeholders of ``model`` (an onnx.ModelProto, edited in place) by
    DequantizeLinear of the WeightCodes ``weights`` {key: WeightCodes}; sets the default
    domain's opset to ``opset`` and drops the placeholder domain."""
    graph = model.graph
    nodes, uses = [], Counter()
    for node in graph.node:
        if node.domain == MARKER_DOMAIN:
            key = node.attribute[0].s.decode()
            node = _dequantize_node(node, weights[key], opset, graph, uses[key])
            uses[key] += 1
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    imports = [helper.make_opsetid("", opset)]
    imports += [o for o in model.opset_import if o.domain not in ("", "ai.onnx", MARKER_DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    onnx.checker.check_model(model)
    return model
