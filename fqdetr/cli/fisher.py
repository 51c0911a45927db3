"""``fqdetr fisher``: per-layer Fisher traces of the overall / critical / mixed objectives."""
from fqdetr.cli._common import add_common, bit_width, non_negative_float, positive_int, prepare


def add_parser(subparsers):
    p = subparsers.add_parser(
        "fisher", help="per-layer Fisher traces (overall, critical, mix) and a Hutchinson baseline",
        description="Computes tr(F_l) per quantized layer of a DETR or Deformable DETR "
                    "(quantized at --w-bits, Fisher taken through "
                    "the quantizers) for each --objective over --images training images, with per-image losses "
                    "(docs/METHOD.md section 2). Writes OUT/fisher.json {objective: {layer: trace}}. Under torchrun "
                    "each process takes a shard of the images and the sums are all-reduced (gloo/nccl).")
    add_common(p)
    p.add_argument("--objective", nargs="+", default=["overall", "critical"], choices=["overall", "critical", "mix"],
                   help="objectives (default: overall critical)")
    p.add_argument("--alpha", type=non_negative_float, default=1.0, help="mix = alpha * L_all + L_crit (default 1)")
    p.add_argument("--images", type=positive_int, default=64, help="training images to average over (default 64)")
    p.add_argument("--w-bits", type=bit_width, default=4, help="weight bits of the model the Fisher is taken on")
    p.add_argument("--hutchinson", action="store_true", help="also estimate Hessian traces (slow; 'hessian' key)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads per process (default: torch's; torchrun gives each process 1). A quantized "
                        "model's traces move by a few percent with it (docs/METHOD.md section 7); the same value "
                        "reproduces a run bit for bit")
    p.set_defaults(func=run)


def run(args):
    import torch

    from fqdetr.engine import distributed as dist
    from fqdetr.engine.loader import make_loader
    from fqdetr.engine.quantize import quantize_detr
    from fqdetr.io import write_json
    from fqdetr.sensitivity import fisher_traces, hutchinson_traces

    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_distributed()
    model, data, loaders, criterion, objectives, S, _, canvas = prepare(args, train_images=max(args.images, 400))
    images = torch.utils.data.Subset(data["train"], range(args.images))
    # Each image once overall: this process's shard, not padded.
    loader = make_loader(images, args.batch_size, canvas, shuffle=False, shard=True, pad=False)
    # Calibrate on the same first images everywhere, so every process quantizes identically.
    calib_loader = make_loader(images, args.batch_size, canvas, shuffle=False)
    qmodel = quantize_detr(model, w_bits=args.w_bits, calib_loader=calib_loader)
    out = {name: fisher_traces(qmodel, loader, objectives[name]) for name in args.objective}
    if args.hutchinson:
        out["hessian"] = hutchinson_traces(qmodel, loader, objectives["overall"])
    out["_meta"] = {"images": args.images, "critical": args.critical, "critical_mode": args.critical_mode,
                    "normalizer": "fixed", "critical_labels": S, "w_bits": args.w_bits,
                    "processes": dist.world_size(), "threads": torch.get_num_threads()}
    if dist.is_main():
        print(f"wrote {write_json(out, f'{args.out}/fisher.json')}")
    dist.cleanup()
    return 0
