"""``fqdetr qat``: quantization-aware training, optionally Fisher-trace regularised."""
from fqdetr.cli._common import (add_common, bit_width, non_negative_float, positive_float, positive_int,
                               read_json_option)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "qat", help="quantization-aware training (LSQ), optional Fisher-trace regulariser or up-weighting",
        description="Trains a quantized DETR or Deformable DETR (uniform --w-bits or an --allocation) "
                    "with LSQ for --steps batches. "
                    "--reg-lambda > 0 adds lambda * tr(F_crit) (docs/METHOD.md section 4); --upweight > 1 instead "
                    "multiplies the critical classes' CE weight. Writes OUT/qat_state.pt (model state, atomic) "
                    "and OUT/qat.json (losses and evaluation). Under torchrun the processes train on shards of the "
                    "data with gradients averaged each step; rank 0 evaluates and writes.")
    add_common(p)
    p.add_argument("--allocation", metavar="JSON", help="allocation.json (else uniform --w-bits)")
    p.add_argument("--w-bits", type=bit_width, default=4, help="uniform weight bits (default 4)")
    p.add_argument("--steps", type=positive_int, default=200, help="training batches (default 200)")
    p.add_argument("--lr", type=positive_float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    p.add_argument("--reg-lambda", type=non_negative_float, default=0.0, help="Fisher-trace regulariser weight (default 0)")
    p.add_argument("--reg-estimator", default="per-sample", choices=["per-sample", "batch"],
                   help="estimator of tr(F_crit) (docs/METHOD.md section 4.2; default per-sample)")
    p.add_argument("--reg-method", default="exact", choices=["exact", "finite-difference"])
    p.add_argument("--upweight", type=positive_float, default=1.0, help="critical classes' CE weight (default 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=run)


def run(args):
    from fqdetr.engine.qat import QatJob, run_qat_job

    allocation = read_json_option(args.allocation, "--allocation") if args.allocation else None
    result = run_qat_job(QatJob(
        model=args.model, data=args.data, out=args.out, allocation=allocation, allocation_path=args.allocation,
        w_bits=args.w_bits, steps=args.steps, lr=args.lr, reg_lambda=args.reg_lambda,
        reg_estimator=args.reg_estimator, reg_method=args.reg_method, upweight=args.upweight, seed=args.seed,
        image_size=args.image_size, batch_size=args.batch_size, eval_images=args.eval_images,
        critical=args.critical))
    if result is not None:  # rank 0
        print(f"val mAP {result['eval']['val']['mAP']}; wrote {args.out}/qat.json")
    return 0
