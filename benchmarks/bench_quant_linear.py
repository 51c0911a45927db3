"""quant_linear (W4A8) forward and forward+backward on DETR shapes, against the baselines
a user would pick: float nn.Linear, the torch.ao learnable fake-quant chain
(_fake_quantize_learnable_per_channel_affine on W + per-tensor on x + F.linear), and
our reference. Encoder: 850 tokens per image, batch B; decoder: 100 queries per image.

Run: make bench (or .venv/bin/python -m pytest benchmarks/bench_quant_linear.py).
Compare rows of one group: same shape, same run, same machine. Peak memory (sampled
resident-set growth during one untimed call) is in each row's extra_info.
"""
import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import fqkernels as fk

SHAPES = {  # name: (tokens, in, out)
    "enc B=2 1700x256->2048": (1700, 256, 2048),
    "enc B=2 1700x256->256": (1700, 256, 256),
    "enc B=8 6800x256->2048": (6800, 256, 2048),
    "enc B=8 6800x256->256": (6800, 256, 256),
    "dec B=2 200x256->2048": (200, 256, 2048),
    "dec B=2 200x256->256": (200, 256, 256),
}
IMPLS = ["float nn.Linear", "torch.ao chain", "reference", "cpu"]
W_BITS, A_BITS = 4, 8


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth_mib(fn):
    """Peak resident-set growth while fn runs, sampled every 0.5 ms (large buffers are
    mmapped and returned on free, so this sees each call's temporaries)."""
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes() - base)
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    fn()
    done.set()
    thread.join()
    return max(peak[0], _rss_bytes() - base) / 2**20


def _step(impl, x, weight, bias, w_scale, a_scale):
    qmin, qmax = -(2 ** (W_BITS - 1)), 2 ** (W_BITS - 1) - 1
    if impl == "float nn.Linear":
        return F.linear(x, weight, bias)
    if impl == "torch.ao chain":
        wq = torch._fake_quantize_learnable_per_channel_affine(weight, w_scale, torch.zeros(weight.shape[0]), 0,
                                                               qmin, qmax, 1.0)
        xq = torch._fake_quantize_learnable_per_tensor_affine(x, a_scale, torch.zeros(1), -128, 127, 1.0)
        return F.linear(xq, wq, bias)
    return fk.quant_linear(x, weight, bias, w_scale, a_scale, W_BITS, A_BITS, backend=impl)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_quant_linear(benchmark, impl, shape_name, mode):
    tokens, k, n = SHAPES[shape_name]
    benchmark.group = f"quant_linear {mode} {shape_name}"
    train = mode == "fwd+bwd"
    params = [torch.randn(tokens, k), torch.randn(n, k) * 0.05, torch.randn(n), torch.rand(n) * 0.01 + 0.005,
              torch.tensor([0.05])]
    params = [p.requires_grad_(train) for p in params]
    g = torch.randn(tokens, n)

    def step():
        if train:
            _step(impl, *params).backward(g)
        else:
            with torch.no_grad():
                _step(impl, *params)

    step()  # warm-up (and oneDNN primitive creation) outside the measurement
    benchmark.extra_info["peak_rss_growth_mib"] = round(peak_rss_growth_mib(step), 1)
    benchmark.pedantic(step, rounds=7, iterations=1, warmup_rounds=1)
