"""``fqdetr qat``: quantization-aware training, optionally Fisher-trace regularised."""
from fqdetr.cli._common import (add_common, bit_width, non_negative_float, positive_float, positive_int, prepare,
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
    p.add_argument("--reg-estimator", default="batch", choices=["batch", "per-sample"])
    p.add_argument("--reg-method", default="exact", choices=["exact", "finite-difference"])
    p.add_argument("--upweight", type=positive_float, default=1.0, help="critical classes' CE weight (default 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=run)


def run(args):
    from fqdetr.engine import distributed as dist
    from fqdetr.engine.checkpoint import seed_everything
    from fqdetr.engine.loader import make_loader
    from fqdetr.engine.qat import qat, upweighted_criterion
    from fqdetr.engine.quantize import quantize_detr
    from fqdetr.engine.setup import evaluate_splits
    from fqdetr.io import atomic_torch_save, write_json

    dist.init_distributed()
    seed_everything(args.seed)
    model, data, loaders, criterion, objectives, S, sets, canvas = prepare(args)
    allocation = read_json_option(args.allocation, "--allocation") if args.allocation else None
    qmodel = quantize_detr(model, allocation=allocation, w_bits=args.w_bits, calib_loader=loaders["train"])
    if args.upweight != 1.0:
        criterion = upweighted_criterion(criterion, S, args.upweight)
    # Under torchrun each process trains on its shard; gradients are averaged every step.
    train_loader = make_loader(data["train"], args.batch_size, canvas, shuffle=True, seed=args.seed, shard=True)
    history = qat(qmodel, criterion, train_loader, args.steps, lr=args.lr, critical_objective=objectives["critical"],
                  reg_lambda=args.reg_lambda, reg_estimator=args.reg_estimator, reg_method=args.reg_method,
                  progress=dist.is_main())
    if dist.is_main():
        atomic_torch_save(qmodel.state_dict(), f"{args.out}/qat_state.pt")
        result = {"history": history, "eval": evaluate_splits(qmodel, loaders, sets), "processes": dist.world_size(),
                  "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"}}
        print(f"val mAP {result['eval']['val']['mAP']}; wrote {write_json(result, f'{args.out}/qat.json')}")
    dist.cleanup()
    return 0
