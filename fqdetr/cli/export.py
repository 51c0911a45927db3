"""``fqdetr export``: a quantized DETR / Deformable DETR as ONNX with QuantizeLinear /
DequantizeLinear (fqdetr.export.export_onnx), for onnxruntime.

    fqdetr export --model M --allocation allocation.json --out model.onnx    # quantize + calibrate here
    fqdetr export --model M --quantized runs/ptq/quantized_state.pt --out model.onnx

The ONNX model carries the float checkpoint's image size, canvas and categories in its
metadata, so ``fqdetr eval`` / ``detect`` run it like the checkpoint it came from.
"""
import math

from fqdetr.cli._common import DATA_HELP, DEFAULT_BUILTIN_DIR, DEFAULT_MODEL, positive_int


def add_parser(subparsers):
    from fqdetr.cli.ptq import add_quantization_arguments

    p = subparsers.add_parser(
        "export", help="export a quantized model as ONNX (QDQ), for onnxruntime",
        description="Quantizes --model (uniform --w-bits or an --allocation, calibrated on --calib-images "
                    "training images of --data) or loads a --quantized checkpoint of it, and writes ONNX with "
                    "integer weights at their bit-width and QuantizeLinear/DequantizeLinear activations.")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="float DETR or Deformable DETR checkpoint "
                                                               "(default: the shipped DETR)")
    p.add_argument("--quantized", metavar="FILE", help="a quantized checkpoint of --model (fqdetr ptq's "
                                                       "quantized_state.pt, fqdetr qat's qat_state.pt) instead of "
                                                       "quantizing here")
    add_quantization_arguments(p)
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="ONNX file to write")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset, 16..21 (default 21; int4 weights need 21)")
    p.add_argument("--data", default=DEFAULT_BUILTIN_DIR, help=f"calibration data: {DATA_HELP}")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="shorter image side (default: the checkpoint's training size, else 128)")
    p.add_argument("--calib-images", type=positive_int, default=32,
                   help="training images that calibrate the activation scales (default 32)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="calibration images per batch (default 8)")
    p.set_defaults(func=run)


def _calibrated(args, metadata):
    """The float model of args.model quantized and calibrated on args.calib_images training images."""
    import torch

    from fqdetr.cli.ptq import quantize_calibrated
    from fqdetr.data import class_names_of
    from fqdetr.engine.loader import make_loader
    from fqdetr.engine.setup import load_datasets
    from fqdetr.models import load_detr_checkpoint

    model = load_detr_checkpoint(args.model).eval()
    train = load_datasets(args.data, metadata["image_size"], num_train=args.calib_images, num_val=1,
                          class_names=class_names_of(metadata))["train"]
    subset = torch.utils.data.Subset(train, range(min(args.calib_images, len(train))))
    loader = make_loader(subset, args.batch_size, metadata["canvas"], shuffle=False)
    return quantize_calibrated(model, args, loader, math.ceil(len(subset) / args.batch_size))[0]


def _loaded(args):
    """The model of args.model with the quantized state of args.quantized."""
    from fqdetr.export import quantized_from_state
    from fqdetr.models import load_detr_checkpoint
    from fqdetr.models.checkpoint import read_checkpoint

    ckpt = read_checkpoint(args.quantized)
    return quantized_from_state(ckpt.get("model", ckpt), args.quantized, float_model=load_detr_checkpoint(args.model))


def run(args):
    from fqdetr.export import export_onnx, float_metadata

    if not args.out.endswith(".onnx"):
        raise ValueError(f"--out: expected a file name ending in .onnx (how fqdetr eval recognises it), got {args.out}")
    if args.quantized and args.allocation:
        raise ValueError("--quantized: give either a quantized checkpoint or an --allocation to quantize with, "
                         "not both")
    metadata = float_metadata(args.model, args.image_size)
    qmodel = _loaded(args) if args.quantized else _calibrated(args, metadata)
    canvas = metadata["canvas"]
    export_onnx(qmodel, args.out, opset=args.opset, example_size=(canvas, canvas), metadata=metadata)
    print(f"wrote {args.out}")
    return 0
