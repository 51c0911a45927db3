"""``fqdetr eval``: COCO evaluation of a detections json, or of a DETR / Deformable DETR
checkpoint on a dataset's val split, with critical-set AP and a report.

    fqdetr eval --gt ann.json --detections det.json --critical person,vehicle --out DIR
    fqdetr eval --model runs/deformable_tiny/best.pth --data data/builtin --out DIR
    fqdetr eval --model model.onnx --data data/builtin --out DIR     # or a packed .fqp, a quantized .pt

``--critical``: comma-separated critical sets; each is a supercategory name, a
category name or a category id, and "a+b" joins members into one set. Default:
every supercategory of the ground truth. A model (float or quantized checkpoint, packed
file, ONNX) is run at the training image size and canvas it records, with its family's
post-processing; its detections go to OUT/detections.json.
"""
import logging

log = logging.getLogger(__name__)


def add_parser(subparsers):
    from fqdetr.cli._common import DATA_HELP, DEFAULT_BUILTIN_DIR, positive_int

    p = subparsers.add_parser("eval", help="COCO mAP, per-category and critical-set AP, report")
    p.add_argument("--gt", help="ground-truth COCO instances json (with --detections)")
    p.add_argument("--detections", help="detections json: list of {image_id, category_id, bbox [x,y,w,h], score}")
    p.add_argument("--model", help="instead of --gt/--detections: a DETR or Deformable DETR model, run on the "
                                   "val split of --data: a float or quantized checkpoint, a packed .fqp file "
                                   "or an .onnx file (recognised by content)")
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


def model_geometry(image_size, metadata):
    """(image size, canvas) of a model: ``image_size`` when given, else the one its metadata
    records (else 128); the canvas it records, else the longest side of a resized image
    (max_size_for)."""
    from fqdetr.data import max_size_for

    image_size = int(image_size or metadata.get("image_size") or 128)
    return image_size, int(metadata.get("canvas") or max_size_for(image_size))


def _evaluate_checkpoint(args):
    """evaluate_detections' result for --model (any kind fqdetr.export.load_artifact reads) on
    the val split of --data (detections written to OUT/detections.json when --out is given)."""
    import torch

    from fqdetr.data import class_names_of
    from fqdetr.engine.evaluate import evaluate_model
    from fqdetr.engine.loader import make_loader
    from fqdetr.engine.setup import load_datasets
    from fqdetr.export import load_artifact
    from fqdetr.io import write_json

    artifact = load_artifact(args.model)
    image_size, canvas = model_geometry(args.image_size, artifact.metadata)
    log.info("%s model %s at image size %d on a %d px canvas", artifact.kind, args.model, image_size, canvas)
    val = load_datasets(args.data, image_size, class_names=class_names_of(artifact.metadata))["val"]
    _check_classes(args, artifact, val)
    subset = torch.utils.data.Subset(val, range(min(args.eval_images, len(val)))) if args.eval_images else val
    out = evaluate_model(artifact.model, make_loader(subset, args.batch_size, canvas, shuffle=False), dataset=val,
                         critical_sets=parse_critical(args.critical))
    if args.out:
        write_json(out["detections"], f"{args.out}/detections.json")
    return out["result"]


def _check_classes(args, artifact, val):
    """ValueError when the model's class count differs from the dataset's."""
    from fqdetr.engine.family import num_classes_of

    classes = artifact.metadata.get("num_classes") if artifact.kind == "onnx" else num_classes_of(artifact.model)
    if classes is not None and val.num_classes != classes:
        raise ValueError(f"--data: {args.data} has {val.num_classes} categories, the model {args.model} "
                         f"{classes} classes")


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
