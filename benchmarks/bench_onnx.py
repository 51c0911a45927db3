"""Inference latency (CPU) of a quantized detector exported to ONNX and run by onnxruntime,
against the PyTorch float model and the PyTorch fake-quant model, in interleaved rounds
(every method once per round, the order rotating; each method's time over the float model's
time in the same round; medians over rounds: bench_e2e's protocol).

  float        the PyTorch float model, no grad
  fake quant   the W4A8 PyTorch model (fqkernels' fake quantization, cached weight codes)
  onnxruntime  its ONNX export (fqdetr.export.export_onnx: int4 weights, int8 Q/DQ
               activations), onnxruntime's CPU provider with as many threads as torch

W4A8 with the family's 8-bit first conv and heads (fqdetr.engine.quantize.quantize_detr),
activation scales calibrated on the batch. Cases: the shipped tiny DETR and the 0.98 M tiny
Deformable DETR shipped until 2026-12-06 (models/warm_start/) on their 200 px canvas at batch 1 and 4; with --cases r50 deformable (FQ_BENCH_R50=1 under pytest) DETR-R50 and
Deformable DETR R50 with random weights at batch 1, 512x672.

Run:  python benchmarks/bench_onnx.py [--cases tiny r50 deformable] [--threads 1] [--rounds 5]
      .venv/bin/python -m pytest benchmarks/bench_onnx.py          (pytest-benchmark)
Results: benchmarks/RESULTS.md, "ONNX export".
"""
import argparse
import functools
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import benchmark_interleaved, interleaved, load_line, median_ratios  # noqa: E402

from fqdetr.engine.quantize import quantize_detr  # noqa: E402
from fqdetr.export import OnnxDetector, export_onnx  # noqa: E402
from fqdetr.models import build_deformable_detr, build_detr, load_detr_checkpoint  # noqa: E402
from fqdetr.quant import calibrate  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "fqdetr" / "shipped_models"
CASES = {  # name: (batch, height, width)
    "tiny DETR B=1": (1, 200, 200),
    "tiny DETR B=4": (4, 200, 200),
    "tiny Deformable DETR B=1": (1, 200, 200),
    "tiny Deformable DETR B=4": (4, 200, 200),
    "DETR-R50 B=1": (1, 512, 672),
    "Deformable R50 B=1": (1, 512, 672),
}
CASE_OPTIONS = {"tiny": ["tiny DETR B=1", "tiny DETR B=4", "tiny Deformable DETR B=1", "tiny Deformable DETR B=4"],
                "r50": ["DETR-R50 B=1"],
                "deformable": ["Deformable R50 B=1"]}
METHODS = ("float", "fake quant", "onnxruntime")


def _float_model(case):
    if case.startswith("tiny Deformable"):
        return load_detr_checkpoint(SHIPPED / "warm_start" / "deformable_tiny_builtin.pth")
    if case.startswith("tiny"):
        return load_detr_checkpoint(SHIPPED / "detr_tiny_builtin.pth")
    if case.startswith("DETR-R50"):
        return build_detr("r50", num_classes=91, dropout=0.0)
    return build_deformable_detr("deformable_r50", num_classes=91, dropout=0.0)


def build_case(case, folder, threads, seed=0):
    """{method: zero-argument forward} of one case: the float model, its W4A8 copy calibrated on
    the batch, and that copy exported to ``folder`` and loaded in onnxruntime."""
    torch.manual_seed(seed)
    batch, h, w = CASES[case]
    model = _float_model(case).eval()
    images, mask = torch.randn(batch, 3, h, w), torch.zeros(batch, h, w, dtype=torch.bool)
    quant = quantize_detr(model)
    calibrate(quant, [(images, mask)], progress=False)
    quant.eval()
    path = export_onnx(quant, os.path.join(folder, f"{case.replace(' ', '_')}.onnx"), example_size=(h, w))
    detector = OnnxDetector(path, threads=threads)

    def forward(m):
        with torch.no_grad():
            return m((images, mask))

    return {"float": functools.partial(forward, model), "fake quant": functools.partial(forward, quant),
            "onnxruntime": functools.partial(forward, detector)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASE_OPTIONS), default=["tiny"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds; {load_line()}")
    with tempfile.TemporaryDirectory() as folder:
        for case in [c for option in args.cases for c in CASE_OPTIONS[option]]:
            runs = build_case(case, folder, args.threads)
            times = interleaved(runs, args.rounds)
            floor_ms = statistics.median(times["float"]) * 1e3
            print(f"\n{case} (float {floor_ms:.0f} ms median; {load_line()})")
            for m, r in median_ratios(times).items():
                print(f"  {m:>12}: {r:5.2f}x float ({statistics.median(times[m]) * 1e3:.0f} ms)")
    return 0


# ---- pytest-benchmark ----

try:
    import pytest
except ImportError:  # the script needs no pytest
    pytest = None

if pytest is not None:
    def _pytest_cases():
        big = os.environ.get("FQ_BENCH_R50") == "1"
        return [c for c in CASES if c.startswith("tiny") or big]

    @pytest.mark.parametrize("case", _pytest_cases())
    def test_onnx_interleaved(benchmark, interleaved_ratios, tmp_path, case):
        """One round = float, fake quant and onnxruntime once each; reports median ratios over rounds."""
        benchmark.group = f"onnx {case}, one round = {' + '.join(METHODS)}"
        runs = build_case(case, str(tmp_path), torch.get_num_threads())
        benchmark_interleaved(benchmark, runs, interleaved_ratios, f"onnx {case}")


if __name__ == "__main__":
    sys.exit(main())
