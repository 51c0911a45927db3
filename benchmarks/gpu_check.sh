#!/usr/bin/env bash
# GPU check for a lent GPU machine (no network there): builds fqkernels._cuda, runs every
# GPU test (cuda backend and compiled Triton against the references) and prints short
# benchmark tables for quant_linear, per-sample Fisher and the whole DETR (bench_e2e.py).
# Usage: bash benchmarks/gpu_check.sh
# Takes a few minutes on an H100; record its output in benchmarks/RESULTS.md with the card.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
FQ_BUILD_CUDA=1 $PY -m pip install -q --no-build-isolation --no-deps -e .
# GPU tests: the cuda backend vs the reference (and triton compiled, not interpreted).
TRITON_INTERPRET=0 $PY -m pytest -q -x tests/test_fake_quant.py tests/test_quant_linear.py \
    tests/test_quant_matmul.py tests/test_fisher_kernels.py

# ---- quant_linear: ms per call ----
$PY - <<'PYEOF'
import torch, torch.nn.functional as F
import fqkernels as fk

def ms(fn, n=50):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / n

print(f"{'shape':>22} {'impl':>12} {'fwd ms':>8} {'fwd+bwd ms':>11}")
for tokens, k, n in [(1700, 256, 2048), (6800, 256, 2048), (6800, 256, 256)]:
    dev = "cuda"
    x = torch.randn(tokens, k, device=dev, requires_grad=True)
    w = (torch.randn(n, k, device=dev) * 0.05).requires_grad_()
    b = torch.randn(n, device=dev, requires_grad=True)
    ws = (torch.rand(n, device=dev) * 0.01 + 0.005).requires_grad_()
    a = torch.tensor([0.05], device=dev, requires_grad=True)
    g = torch.randn(tokens, n, device=dev)
    xb, wb = x.detach().bfloat16(), w.detach().bfloat16()
    impls = {
        "bf16 cuBLAS": lambda: F.linear(xb, wb),
        "fp32 linear": lambda: F.linear(x, w, b),
        "torch.ao": lambda: F.linear(
            torch._fake_quantize_learnable_per_tensor_affine(x, a, torch.zeros(1, device=dev), -128, 127, 1.0),
            torch._fake_quantize_learnable_per_channel_affine(w, ws, torch.zeros(n, device=dev), 0, -8, 7, 1.0), b),
        **{be: (lambda be=be: fk.quant_linear(x, w, b, ws, a, 4, 8, backend=be)) for be in ("cuda", "triton")},
    }
    for name, fn in impls.items():
        with torch.no_grad():
            fwd = ms(fn)
        train = (lambda fn=fn: fn().backward(g)) if name != "bf16 cuBLAS" else None
        fb = ms(train, 20) if train else float("nan")
        print(f"{tokens}x{k}->{n:>6} {name:>12} {fwd:8.3f} {fb:11.3f}")

# ---- per-sample Fisher: kernel alone vs the plain weight-gradient matmul ----

print(f"{'N,T,K->M':>18} {'dW mm ms':>9} {'cuda x':>7} {'triton x':>9}")
for n, t, k, m in [(32, 100, 256, 256), (32, 850, 256, 2048), (8, 850, 2048, 256)]:
    x, g = torch.randn(n, t, k, device="cuda"), torch.randn(n, t, m, device="cuda")
    base = ms(lambda: g.reshape(-1, m).t() @ x.reshape(-1, k))
    ratios = [ms(lambda be=be: fk.per_sample_fisher(x, g, backend=be)) / base for be in ("cuda", "triton")]
    print(f"{f'{n},{t},{k}->{m}':>18} {base:9.3f} {ratios[0]:7.2f} {ratios[1]:9.2f}")
PYEOF

# ---- whole model: QAT step, Fisher on a batch, quantized forward (x the float model, same run) ----
# Tiny DETR and tiny Deformable DETR batch 4, DETR-R50 and Deformable R50 batch 2 at 512x672,
# ending with the issue's table; on the GPU the inference forward is the cached fake-quant
# path (the integer kernels of fqdetr.quant.inference are CPU-only).
$PY benchmarks/bench_e2e.py --quick --device cuda --cases tiny r50 deformable_tiny deformable_r50
