"""fake_quant forward+backward: our backends against torch's learnable fake-quant ops.

Run: make bench (or .venv/bin/python -m pytest benchmarks/bench_fake_quant.py).
Compare rows of one group: same shape, same run, same machine.
"""
import pytest
import torch

import fqkernels as fk

SHAPES = {"weight 2048x256 per-channel": ((2048, 256), 0), "activation 1700x256 per-tensor": ((1700, 256), None)}


def _torch_chain(x, s, axis):
    if axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(x, s, torch.zeros(1), -8, 7, 1.0)
    return torch._fake_quantize_learnable_per_channel_affine(x, s, torch.zeros(s.numel()), axis, -8, 7, 1.0)


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("impl", ["torch.ao", "reference", "cpu"])
def test_fake_quant_fwd_bwd(benchmark, shape_name, impl):
    shape, axis = SHAPES[shape_name]
    benchmark.group = f"fake_quant fwd+bwd {shape_name}"
    x = torch.randn(shape, requires_grad=True)
    s = (torch.rand(shape[0] if axis == 0 else 1) * 0.1 + 0.01).requires_grad_()
    g = torch.randn(shape)

    def step():
        y = _torch_chain(x, s, axis) if impl == "torch.ao" else fk.fake_quant(x, s, 4, True, axis, backend=impl)
        y.backward(g)

    benchmark(step)
