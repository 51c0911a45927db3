"""``fqdetr eval``: COCO evaluation of a detections json, or of a DETR / Deformable DETR
checkpoint on a dataset's val split, with critical-set AP and a report.

    fqdetr eval --gt ann.json --detections det.json --critical person,vehicle --out DIR
    fqdetr eval --model runs/deformable_tiny/best.pth --data data/builtin --out DIR

``--critical``: comma-separated critical sets; each is a supercategory name, a
category name or a category id, and "a+b" joins members into one set. Default:
every supercategory of the ground truth. A checkpoint is run at its training image size
and canvas, with its family's post-processing; its detections go to OUT/detections.json.
"""
import logging

log = logging.getLogger(__name__)


def add_parser(subparsers):
    from fqdetr.cli._common import DATA_HELP, DEFAULT_BUILTIN_DIR, positive_int

    p = subparsers.add_parser("eval", help="COCO mAP, per-category and critical-set AP, report")
    p.add_argument("--gt", help="ground-truth COCO instances json (with --detections)")
    p.add_argument("--detections", help="detections json: list of {image_id, category_id, bbox [x,y,w,h], score}")
    p.add_argument("--model", help="instead of --gt/--detections: a DETR or Deformable DETR checkpoint, run on "
                                   "the val split of --data")
    p.add_argument("--data", default=DEFAULT_BUILTIN_DIR, help=f"with --model: {DATA_HELP}")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="with --model: shorter image side (default: the checkpoint's training size, else 128)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="with --model: images per batch (default 8)")
    p.add_argument("--eval-images", type=positive_int, default=None,
                   help="with --model: the first N val images only (default: all)")
    p.add_argument("--critical", default=None,
                   help="comma-separated critical sets, e.g. person,vehicle or person+animal "
                        "(default: every supercategory)")
    p.add_argument("--out", default=None, help="write report.json, report.md and plots here")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG bar charts")
    p.set_defaults(func=run)


def parse_critical(text):
    """'person,vehicle' -> ['person', 'vehicle']; None/'' -> None (every supercategory)."""
    if not text:
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


def _evaluate_checkpoint(args):
    """evaluate_detections' result for --model on the val split of --data (detections written to
    OUT/detections.json when --out is given)."""
    import torch

    from fqdetr.data import class_names_of
    from fqdetr.engine.evaluate import evaluate_model
    from fqdetr.engine.family import num_classes_of
    from fqdetr.engine.loader import make_loader
    from fqdetr.engine.setup import checkpoint_geometry, load_datasets
    from fqdetr.io import write_json
    from fqdetr.models import load_detr_checkpoint
    from fqdetr.models.checkpoint import read_checkpoint

    model = load_detr_checkpoint(args.model).eval()
    image_size, canvas = checkpoint_geometry(args.model, args.image_size)
    val = load_datasets(args.data, image_size, class_names=class_names_of(read_checkpoint(args.model)))["val"]
    if val.num_classes != num_classes_of(model):
        raise ValueError(f"--data: {args.data} has {val.num_classes} categories, the model {args.model} "
                         f"{num_classes_of(model)} classes")
    subset = torch.utils.data.Subset(val, range(min(args.eval_images, len(val)))) if args.eval_images else val
    out = evaluate_model(model, make_loader(subset, args.batch_size, canvas, shuffle=False), dataset=val,
                         critical_sets=parse_critical(args.critical))
    if args.out:
        write_json(out["detections"], f"{args.out}/detections.json")
    return out["result"]


def run(args):
    from fqdetr.evaluation import evaluate_detections, render_markdown, write_report

    if args.model and (args.gt or args.detections):
        raise ValueError("--model: give either a checkpoint or --gt with --detections, not both")
    if args.model:
        result = _evaluate_checkpoint(args)
    elif args.gt and args.detections:
        result = evaluate_detections(args.gt, args.detections, critical_sets=parse_critical(args.critical))
    else:
        raise ValueError("--gt and --detections (a detections json), or --model (a checkpoint), are required")
    if args.out:
        paths = write_report(result, args.out, plots=not args.no_plots)
        log.info("report: %s", paths["markdown"])
    else:
        print(render_markdown(result))
    return 0
