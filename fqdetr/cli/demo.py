"""``fqdetr demo``: the main job on the built-in dataset and the shipped detectors."""
from pathlib import Path

from fqdetr.cli._common import (DATA_HELP, DEFAULT_BUILTIN_DIR, DEFAULT_MODEL, non_negative_float, positive_float,
                               positive_int)


def shipped_models():
    """Every detector checkpoint shipped with the package (the folder of DEFAULT_MODEL), sorted."""
    return sorted(str(p) for p in Path(DEFAULT_MODEL).parent.glob("*.pth"))


def add_parser(subparsers):
    p = subparsers.add_parser(
        "demo", help="the main job: float vs PTQ vs Fisher-aware allocation vs QAT variants",
        description="Runs docs/METHOD.md sections 1-4 end to end on the built-in dataset for each detector "
                    "(every shipped one: DETR and Deformable DETR; or each --model): "
                    "float eval; uniform 4-bit PTQ; Fisher-overall vs Fisher-critical bit allocations at the "
                    "same average-bit budget; short QAT plain, with Fisher-trace regularisation and with the "
                    "critical classes up-weighted; a picture of the float, uniform 4-bit and Fisher-critical "
                    "detections on 4 val images. Writes OUT/report.md (a section per detector), "
                    "OUT/results.json (with each arm's wall and CPU seconds), detections.png and, "
                    "for several detectors, each one's files in OUT/<checkpoint name>/.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--model", action="append", default=None, metavar="CKPT",
                   help="a DETR or Deformable DETR checkpoint; repeat for several (default: every shipped model)")
    p.add_argument("--data", default=DEFAULT_BUILTIN_DIR, help=DATA_HELP)
    p.add_argument("--critical", default="person", help="critical set: a supercategory or category name")
    p.add_argument("--budget", type=positive_float, default=4.0, help="average weight bits of the allocations (default 4)")
    # Their defaults depend on the detector (fqdetr.experiments.demo.DEMO_SIZES), so None here.
    p.add_argument("--qat-steps", type=positive_int, default=None,
                   help="QAT steps per variant (default: 40 for DETR, 8 for Deformable DETR)")
    p.add_argument("--fisher-images", type=positive_int, default=None,
                   help="training images for the Fisher traces (default: 48 for DETR, 48 for Deformable DETR)")
    p.add_argument("--eval-images", type=positive_int, default=None,
                   help="val (and train-subset) images evaluated (default: 120 for DETR, 120 for Deformable DETR)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (default 8)")
    p.add_argument("--reg-lambda", type=non_negative_float, default=0.05, help="Fisher-trace regulariser weight")
    p.add_argument("--upweight", type=positive_float, default=3.0, help="class weight of critical classes (baseline)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=positive_int, default=2,
                   help="torch CPU threads (default 2, as the README's numbers were made: the quantized arms "
                        "change in the last bits with the thread count, which can move an AP by a point on "
                        "120 images; docs/METHOD.md section 7)")
    p.set_defaults(func=run)


def run(args):
    import torch

    from fqdetr.experiments.demo import run_demos

    torch.set_num_threads(args.threads)
    models = args.model or shipped_models()
    missing = [m for m in models if not Path(m).is_file()]
    if missing:
        raise FileNotFoundError(f"--model: {', '.join(missing)} does not exist")
    run_demos(args.out, models, args.data, critical=args.critical, budget_avg_bits=args.budget,
             qat_steps=args.qat_steps, fisher_images=args.fisher_images, eval_images=args.eval_images,
             batch_size=args.batch_size, reg_lambda=args.reg_lambda, upweight=args.upweight, seed=args.seed)
    return 0
