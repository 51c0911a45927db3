"""``fqdetr eval``: COCO evaluation of a detections json, with critical-set AP and a report.

    fqdetr eval --gt ann.json --detections det.json --critical person,vehicle --out DIR

``--critical``: comma-separated critical sets; each is a supercategory name, a
category name or a category id, and "a+b" joins members into one set. Default:
every supercategory of the ground truth. (Evaluating a model checkpoint directly is
to come; for now produce detections in COCO result format first.)
"""
import logging

log = logging.getLogger(__name__)


def add_parser(subparsers):
    p = subparsers.add_parser("eval", help="COCO mAP, per-category and critical-set AP, report")
    p.add_argument("--gt", required=True, help="ground-truth COCO instances json")
    p.add_argument("--detections", required=True,
                   help="detections json: list of {image_id, category_id, bbox [x,y,w,h], score}")
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


def run(args):
    from fqdetr.evaluation import evaluate_detections, render_markdown, write_report

    result = evaluate_detections(args.gt, args.detections, critical_sets=parse_critical(args.critical))
    if args.out:
        paths = write_report(result, args.out, plots=not args.no_plots)
        log.info("report: %s", paths["markdown"])
    else:
        print(render_markdown(result))
    return 0
