"""The README's size table: float checkpoint, packed W4A8 checkpoint and ONNX file, in MiB.

    OMP_NUM_THREADS=1 python benchmarks/model_sizes.py                 # every row
    OMP_NUM_THREADS=1 python benchmarks/model_sizes.py --cases tiny    # the shipped models only

Each model is quantized as the CLI does (fqdetr.engine.quantize.quantize_detr: W4A8, the family's
8-bit first conv and heads), its activation scales calibrated on one random batch (sizes do not
depend on the scales' values), then written with fqdetr.export.save_packed and, for the shipped
models, fqdetr.export.export_onnx. "float checkpoint" is the shipped .pth file for the shipped
models; the R50 presets (random weights, 91 classes) are written with save_detr_checkpoint. The
ratio is float checkpoint / packed. Prints a markdown table.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fqdetr.engine.quantize import quantize_detr  # noqa: E402
from fqdetr.export import export_onnx, save_packed  # noqa: E402
from fqdetr.models import build_deformable_detr, build_detr, load_detr_checkpoint  # noqa: E402
from fqdetr.models.checkpoint import save_detr_checkpoint  # noqa: E402
from fqdetr.quant import calibrate  # noqa: E402

MODELS = ROOT / "models"
# row name: (shipped file or preset, calibration image size, ONNX exported)
CASES = {
    "shipped tiny DETR": ("detr_tiny_builtin.pth", (200, 200), True),
    "shipped Deformable DETR": ("deformable_small_builtin.pth", (200, 200), True),
    "DETR-R50": ("r50", (128, 160), False),
    "Deformable DETR R50": ("deformable_r50", (128, 160), False),
}
CASE_OPTIONS = {"tiny": ["shipped tiny DETR", "shipped Deformable DETR"],
                "r50": ["DETR-R50", "Deformable DETR R50"]}
MIB = 2 ** 20


def mib(path):
    return os.path.getsize(path) / MIB


def sizes(case, folder):
    """(float MiB, packed MiB, ONNX MiB or None) of one row."""
    source, (h, w), onnx = CASES[case]
    stem = os.path.join(folder, case.replace(" ", "_"))
    if source.endswith(".pth"):
        float_path = MODELS / source
        model = load_detr_checkpoint(float_path)
    else:
        build = build_detr if source == "r50" else build_deformable_detr
        model = build(source, num_classes=91, dropout=0.0)
        float_path = stem + ".pth"
        save_detr_checkpoint(model, float_path)
    model.eval()
    torch.manual_seed(0)
    qmodel = quantize_detr(model)
    calibrate(qmodel, [(torch.randn(1, 3, h, w), torch.zeros(1, h, w, dtype=torch.bool))], progress=False)
    qmodel.eval()
    packed = save_packed(qmodel, stem + ".fqp")
    onnx_mib = mib(export_onnx(qmodel, stem + ".onnx")) if onnx else None
    return mib(float_path), mib(packed), onnx_mib


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASE_OPTIONS), default=list(CASE_OPTIONS))
    args = parser.parse_args(argv)
    print("| model | float checkpoint | packed | ONNX |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for option in args.cases:
            for case in CASE_OPTIONS[option]:
                fl, pk, ox = sizes(case, folder)
                onnx_cell = f" {ox:.2f} MiB " if ox is not None else " "
                print(f"| {case} | {fl:.2f} MiB | {pk:.2f} MiB ({fl / pk:.1f}x) |{onnx_cell}|", flush=True)


if __name__ == "__main__":
    main()
