"""``fqdetr reproduce``: the findings study of docs/METHOD.md section 6 over several seeds, with
paired bootstrap intervals, intervals across seeds and a verdict per finding."""
import logging

log = logging.getLogger(__name__)

FULL_DATA = "data/builtin8k"  # the dataset the shipped DETR was trained on (models/README.md)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "reproduce", help="the findings study: every arm, several seeds, intervals and verdicts (long)",
        description="For each seed: Fisher / calibration images drawn from the training split; PTQ arms at one "
                    "size (uniform, random draws, Hessian, Fisher-overall, Fisher-critical per T_S mode); QAT "
                    "plain / regularised / up-weighted; finding 1 per category and supercategory. Writes "
                    "OUT/summary.json and OUT/findings.md (every difference with its paired bootstrap interval "
                    "over val images and a t interval over seeds; the wall time). Per-seed results are cached in "
                    "OUT/seed<k>/run.json, so an interrupted study resumes. Several --model (each with its "
                    "--data, or one --data for all) run one after the other in OUT/<model name>/, plus finding 5.")
    from fqdetr.cli._common import DEFAULT_MODEL, int_list, positive_int

    p.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    p.add_argument("--model", action="append", default=None,
                   help=f"DETR or Deformable DETR checkpoint; repeat for finding 5 (default {DEFAULT_MODEL.name})")
    p.add_argument("--data", action="append", default=None,
                   help=f"dataset folder per --model, or one for all (default {FULL_DATA}, else data/builtin)")
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2, 3, 4], help="comma-separated seeds (default 0-4)")
    p.add_argument("--critical", default="person", help="critical set (default person)")
    p.add_argument("--modes", type=lambda t: tuple(t.split(",")), default=("lse", "matched", "contrast"),
                   help="critical-objective T_S modes of the Fisher-critical arms; the first one also starts "
                        "QAT (default lse,matched,contrast)")
    p.add_argument("--eval-images", type=positive_int, default=500,
                   help="val images, and training images for the train-val gap (default 500: the full val split)")
    p.add_argument("--fisher-images", type=positive_int, default=200,
                   help="Fisher / calibration images per seed (default 200)")
    p.add_argument("--qat-steps", type=positive_int, default=40, help="QAT steps per variant (default 40)")
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--random-draws", type=positive_int, default=3, help="random allocations per seed (default 3)")
    p.add_argument("--hutchinson-probes", type=positive_int, default=2, help="probes per batch (default 2)")
    p.add_argument("--finding1-mode", default="matched", help="T_S mode of finding 1's traces (default matched)")
    p.add_argument("--finding1-bits", type=positive_int, default=3, help="finding 1's PTQ bits (default 3)")
    p.add_argument("--finding1-images", type=positive_int, default=None,
                   help="Fisher images of finding 1's 20 group traces (default: all --fisher-images)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="batch size (default 8)")
    p.set_defaults(func=run)


def _datasets(data, models):
    """One dataset folder per model; the default is FULL_DATA, else the generated data/builtin."""
    from pathlib import Path

    from fqdetr.cli._common import DEFAULT_BUILTIN_DIR

    if data is None:
        if not (Path(FULL_DATA) / "annotations").is_dir():
            log.warning("reproduce: %s not found (make it with 'fqdetr data make --out %s --num-train 8000 "
                        "--num-val 500'); using %s, which is NOT the shipped model's training data",
                        FULL_DATA, FULL_DATA, DEFAULT_BUILTIN_DIR)
            return [DEFAULT_BUILTIN_DIR] * len(models)
        return [FULL_DATA] * len(models)
    if len(data) not in (1, len(models)):
        raise ValueError(f"--data: expected one folder or one per --model ({len(models)}), got {len(data)}")
    return data * len(models) if len(data) == 1 else data


def run(args):
    from fqdetr.cli._common import DEFAULT_MODEL
    from fqdetr.experiments.findings import reproduce_models
    from fqdetr.experiments.study import StudyConfig

    models = args.model or [str(DEFAULT_MODEL)]
    cfg = StudyConfig(critical=args.critical, modes=args.modes, eval_images=args.eval_images,
                      fisher_images=args.fisher_images, qat_steps=args.qat_steps, bootstrap=args.bootstrap,
                      random_draws=args.random_draws, hutchinson_probes=args.hutchinson_probes,
                      finding1_mode=args.finding1_mode, finding1_bits=args.finding1_bits,
                      finding1_images=args.finding1_images, batch_size=args.batch_size)
    text = reproduce_models(args.out, models, _datasets(args.data, models), args.seeds, cfg)
    print(text)
    return 0
