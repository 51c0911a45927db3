"""torch.compile(fullgraph=True) and torch.export of the quantized modules and of the quantized
tiny DETR: no graph break, and the same outputs and gradients as eager."""
import copy

import pytest
import torch
from torch import nn

from fqdetr.models import build_detr
from fqdetr.quant import (LayerQuantConfig, QuantConfig, QuantConv2d, QuantLinear, QuantMultiheadAttention,
                          quantize_model)

CONFIGS = {
    "w4a8-attention-lsq": LayerQuantConfig(w_bits=4, a_bits=8, quantize_attention=True, lsq_grad_scale=True),
    "w3-weight-only": LayerQuantConfig(w_bits=3, a_bits=None),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled frames are cached per code object: without a reset, a frame compiled (with
    graph breaks) by an earlier test would let a later fullgraph=True compile pass."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _module_and_inputs(kind, config):
    """A quantized module, initialised by one eager call, and inputs for it."""
    torch.manual_seed(0)
    if kind == "linear":
        module, inputs = QuantLinear.from_float(nn.Linear(8, 6), config), (torch.randn(2, 5, 8),)
    elif kind == "conv":
        module, inputs = QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1), config), (torch.randn(2, 3, 6, 6),)
    else:
        mha = nn.MultiheadAttention(8, 2, dropout=0.3)  # dropout too: compiled in training mode below
        module, inputs = QuantMultiheadAttention.from_float(mha, config), (torch.randn(5, 2, 8), torch.randn(7, 2, 8))
        inputs = (inputs[0], inputs[1], inputs[1])
    module(*inputs)
    return module, inputs


def _forward_backward(call, params, inputs):
    """Output, input gradients and {name: parameter gradient} of sum(out^2) (first output of a tuple)."""
    inputs = [t.clone().requires_grad_() for t in inputs]
    out = call(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    return out.detach(), [t.grad for t in inputs], {n: p.grad for n, p in params.named_parameters()}


def _assert_same_forward_backward(compiled, module, eager, inputs):
    torch.manual_seed(1)  # the same dropout draws in both runs
    got = _forward_backward(compiled, module, inputs)
    torch.manual_seed(1)
    want = _forward_backward(eager, eager, inputs)
    torch.testing.assert_close(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b)
    assert got[2].keys() == want[2].keys() and all(g is not None for g in want[2].values())
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], msg=name)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("kind", ["linear", "conv", "mha"])
def test_fullgraph_compile_matches_eager_forward_and_backward(kind, config):
    eager, inputs = _module_and_inputs(kind, config)
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    _assert_same_forward_backward(compiled, module, eager, inputs)
    # A new shape recompiles (dynamic sizes) without a graph break either.
    longer = tuple(torch.cat([t, t], dim=0) for t in inputs)
    _assert_same_forward_backward(compiled, module, eager, longer)


def test_inductor_fullgraph_quant_linear_matches_eager():
    eager, inputs = _module_and_inputs("linear", CONFIGS["w4a8-attention-lsq"])
    module = copy.deepcopy(eager)
    _assert_same_forward_backward(torch.compile(module, fullgraph=True), module, eager, inputs)


@pytest.mark.parametrize("kind", ["linear", "conv", "mha"])
def test_export_of_a_quantized_module_matches_eager(kind):
    module, inputs = _module_and_inputs(kind, CONFIGS["w4a8-attention-lsq"])
    module.eval()
    program = torch.export.export(module, inputs)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("fqkernels" in t for t in targets), targets  # the quantized kernels, not a float fallback
    scaled = tuple(t * 1.5 for t in inputs)  # other values, same shapes: the program computes, not replays
    torch.testing.assert_close(program.module()(*scaled), module(*scaled))


def test_state_dict_load_marks_quantizers_initialised():
    """Compiled code guards on a Python copy of the ``initialized`` buffer: loading a state
    dict must update it, or the next call would re-initialise the scales from its data."""
    trained, inputs = _module_and_inputs("linear", CONFIGS["w4a8-attention-lsq"])
    fresh = QuantLinear.from_float(nn.Linear(8, 6), CONFIGS["w4a8-attention-lsq"])
    fresh.load_state_dict(trained.state_dict())
    big = inputs[0] * 10  # would give a 10x larger activation scale if it initialised from it
    torch.testing.assert_close(fresh(big), trained(big), rtol=0, atol=0)
    torch.testing.assert_close(fresh.input_quantizer.scale, trained.input_quantizer.scale, rtol=0, atol=0)


def test_quantized_tiny_detr_compiles_as_one_graph():
    torch.manual_seed(0)
    model = quantize_model(build_detr("tiny", num_classes=5).eval(), QuantConfig(w_bits=4, a_bits=8,
                                                                               quantize_attention=True))
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 40:] = True  # a padded image: the key padding masks are traced too
    with torch.no_grad():
        want = model((images, mask))
        got = torch.compile(model, fullgraph=True, backend="eager")((images, mask))
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
