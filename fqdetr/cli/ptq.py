"""``fqdetr ptq``: post-training quantization (calibrate, apply bits, evaluate, export)."""
from fqdetr.cli._common import add_common, bit_width, positive_int, prepare, read_json_option


def add_parser(subparsers):
    p = subparsers.add_parser(
        "ptq", help="post-training quantization: calibrate, evaluate, export integer weights",
        description="Quantizes a DETR or Deformable DETR (uniform --w-bits or an --allocation from "
                    "'fqdetr allocate'), calibrates "
                    "activation scales on a few training batches, evaluates overall and critical mAP on val and "
                    "a train subset, and exports integer codes + scales. Writes OUT/ptq.json, "
                    "OUT/quantized_codes.pt and OUT/quantized_state.pt.")
    add_common(p)
    p.add_argument("--allocation", metavar="JSON", help="allocation.json (else uniform --w-bits)")
    p.add_argument("--w-bits", type=bit_width, default=4, help="uniform weight bits (default 4)")
    p.add_argument("--a-bits", type=bit_width, default=8, help="activation bits (default 8)")
    p.add_argument("--calibration", default="max", choices=["max", "percentile", "mse"])
    p.add_argument("--calib-batches", type=positive_int, default=4, help="calibration batches (default 4)")
    p.set_defaults(func=run)


def run(args):
    from fqdetr.engine.quantize import quantize_detr
    from fqdetr.engine.setup import evaluate_splits
    from fqdetr.io import atomic_torch_save, write_json
    from fqdetr.quant import calibrate, save_quantized

    model, data, loaders, _, _, _, sets, _ = prepare(args)
    allocation = read_json_option(args.allocation, "--allocation") if args.allocation else None
    qmodel = quantize_detr(model, allocation=allocation, w_bits=args.w_bits, a_bits=args.a_bits)
    calibrate(qmodel, ((im, m) for im, m, _ in loaders["train"]), method=args.calibration,
              num_batches=args.calib_batches)
    result = {"allocation": allocation or f"uniform w{args.w_bits}a{args.a_bits}",
              "eval": evaluate_splits(qmodel, loaders, sets)}
    save_quantized(qmodel, f"{args.out}/quantized_codes.pt")
    atomic_torch_save(qmodel.state_dict(), f"{args.out}/quantized_state.pt")
    print(f"val mAP {result['eval']['val']['mAP']}; wrote {write_json(result, f'{args.out}/ptq.json')}")
    return 0
