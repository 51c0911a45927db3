"""``fqdetr reproduce``: docs/METHOD.md section 6 findings 1-4 over several seeds."""


def add_parser(subparsers):
    p = subparsers.add_parser(
        "reproduce", help="reproduce the paper's findings 1-4 over several seeds (long)",
        description="Runs the demo pipeline for each --seeds value plus a per-category sensitivity study "
                    "(Fisher trace vs PTQ AP drop), then writes OUT/summary.json and OUT/findings.md with mean ± "
                    "std over seeds and an honest verdict per finding. Per-seed results are cached in "
                    "OUT/seed<k>/run.json, so an interrupted run resumes.")
    from fqdetr.cli._common import DATA_HELP, DEFAULT_BUILTIN_DIR, DEFAULT_MODEL, int_list, positive_int

    p.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="DETR or Deformable DETR checkpoint (default: the shipped DETR)")
    p.add_argument("--data", default=DEFAULT_BUILTIN_DIR, help=DATA_HELP)
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--critical", default="person", help="critical set (default person)")
    p.add_argument("--qat-steps", type=positive_int, default=40, help="QAT steps per variant (default 40)")
    p.add_argument("--fisher-images", type=positive_int, default=48, help="images for Fisher traces (default 48)")
    p.add_argument("--eval-images", type=positive_int, default=120, help="val / train images evaluated (default 120)")
    p.set_defaults(func=run)


def run(args):
    from pathlib import Path

    from fqdetr.experiments.findings import render_findings, reproduce
    from fqdetr.io import atomic_write_text

    summary = reproduce(args.out, args.model, args.data, seeds=args.seeds, critical=args.critical,
                        qat_steps=args.qat_steps, fisher_images=args.fisher_images, eval_images=args.eval_images)
    text = render_findings(summary, args.critical, args.seeds)
    atomic_write_text(Path(args.out) / "findings.md", text)
    print(text)
    return 0
