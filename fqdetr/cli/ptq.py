"""``fqdetr ptq``: post-training quantization (calibrate, apply bits, evaluate, export)."""
from fqdetr.cli._common import add_common, bit_width, positive_int, prepare, read_json_option


def add_quantization_arguments(p):
    """--allocation, --w-bits, --a-bits, --calibration: how ptq (and export) quantize a model."""
    p.add_argument("--allocation", metavar="JSON", help="allocation.json (else uniform --w-bits)")
    p.add_argument("--w-bits", type=bit_width, default=4, help="uniform weight bits (default 4)")
    p.add_argument("--a-bits", type=bit_width, default=8, help="activation bits (default 8)")
    p.add_argument("--calibration", default="max", choices=["max", "percentile", "mse"])


def add_parser(subparsers):
    p = subparsers.add_parser(
        "ptq", help="post-training quantization: calibrate, evaluate, export integer weights",
        description="Quantizes a DETR or Deformable DETR (uniform --w-bits or an --allocation from "
                    "'fqdetr allocate'), calibrates "
                    "activation scales on a few training batches, evaluates overall and critical mAP on val and "
                    "a train subset, and exports integer codes + scales. Writes OUT/ptq.json, "
                    "OUT/quantized_codes.pt, OUT/quantized_state.pt (a quantized checkpoint: state dict, "
                    "config, image size and canvas, which fqdetr eval / export / detect take) and, with "
                    "--packed, a packed integer checkpoint.")
    add_common(p)
    add_quantization_arguments(p)
    p.add_argument("--calib-batches", type=positive_int, default=4, help="calibration batches (default 4)")
    p.add_argument("--packed", metavar="FILE.fqp", help="also write the packed integer checkpoint (weights "
                                                        "at their bit-width) to this file")
    p.set_defaults(func=run)


def quantize_calibrated(model, args, loader, batches):
    """(quantized copy of ``model`` as args' quantization arguments say, calibrated on
    ``batches`` batches of ``loader``; the allocation read, or None)."""
    from fqdetr.engine.quantize import quantize_detr
    from fqdetr.quant import calibrate

    allocation = read_json_option(args.allocation, "--allocation") if args.allocation else None
    qmodel = quantize_detr(model, allocation=allocation, w_bits=args.w_bits, a_bits=args.a_bits)
    calibrate(qmodel, ((im, m) for im, m, _ in loader), method=args.calibration, num_batches=batches)
    return qmodel.eval(), allocation


def run(args):
    from fqdetr.engine.setup import evaluate_splits
    from fqdetr.export import float_metadata, save_packed, save_quantized_checkpoint
    from fqdetr.io import write_json
    from fqdetr.quant import save_quantized

    if args.packed and not args.packed.endswith(".fqp"):
        raise ValueError(f"--packed: expected a file name ending in .fqp (how fqdetr eval recognises it), "
                         f"got {args.packed}")
    model, _, loaders, _, _, _, sets, _ = prepare(args)
    qmodel, allocation = quantize_calibrated(model, args, loaders["train"], args.calib_batches)
    result = {"allocation": allocation or f"uniform w{args.w_bits}a{args.a_bits}",
              "eval": evaluate_splits(qmodel, loaders, sets)}
    metadata = float_metadata(args.model, args.image_size)
    save_quantized(qmodel, f"{args.out}/quantized_codes.pt")
    save_quantized_checkpoint(qmodel, f"{args.out}/quantized_state.pt", metadata)
    if args.packed:
        save_packed(qmodel, args.packed, metadata)
    print(f"val mAP {result['eval']['val']['mAP']}; wrote {write_json(result, f'{args.out}/ptq.json')}")
    return 0
