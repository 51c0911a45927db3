"""Arguments and set-up shared by the method's sub-commands (fisher, allocate, ptq, qat)."""
import json
from pathlib import Path
from typing import Any, NamedTuple

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "detr_tiny_builtin.pth"


def add_common(p, data=True):
    """--config, --model, --out and (with ``data``) the dataset arguments."""
    p.add_argument("--config", metavar="FILE", help="JSON or YAML file of defaults for these options "
                                                    "(keys are the option names with '_'); flags override it")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="DETR checkpoint (default: the shipped one)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder for the outputs")
    if data:
        g = p.add_argument_group("data")
        g.add_argument("--data", default="data/builtin", help="COCO-layout dataset folder; the built-in "
                                                              "dataset is generated there when missing")
        g.add_argument("--image-size", type=int, default=None,
                       help="shorter image side (default: the checkpoint's training size, else 128)")
        g.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
        g.add_argument("--eval-images", type=int, default=200,
                       help="val images (and as many training images) evaluated (default 200)")
        g.add_argument("--critical", default="person",
                       help="critical set: a supercategory, a category name, or names joined by '+'")
    p.set_defaults(_parser=p)


def load_config_file(path):
    """A dict of option defaults from JSON or YAML (safe loader only)."""
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError, Exception) as err:
        raise SystemExit(f"--config: cannot read {path}: {err}")
    if not isinstance(data, dict):
        raise SystemExit(f"--config: {path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def read_json_option(path, option):
    """The JSON object in file ``path`` given to ``option`` (e.g. "--allocation"); a clear
    SystemExit naming both when it is missing, unreadable or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:  # missing, a directory, not UTF-8, invalid JSON
        raise SystemExit(f"{option}: cannot read {path} as JSON: {err}")
    if not isinstance(data, dict):
        raise SystemExit(f"{option}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def apply_config(parser, args, argv):
    """Re-parses ``argv`` with the --config file's values as defaults (flags still win)."""
    if not getattr(args, "config", None):
        return args
    values = load_config_file(args.config)
    unknown = sorted(set(values) - set(vars(args)))
    if unknown:
        raise SystemExit(f"--config: unknown options {unknown} in {args.config}")
    args._parser.set_defaults(**values)
    return parser.parse_args(argv)


def write_json(obj, path):
    from fqdetr.io import atomic_write_text

    return atomic_write_text(path, json.dumps(obj, indent=2))


class Prepared(NamedTuple):
    """What ``prepare`` sets up for a command; ``canvas``: the model's padding canvas, for any
    further fqdetr.engine.loader.make_loader."""

    model: Any
    data: dict
    loaders: dict
    criterion: Any
    objectives: dict
    S: list
    sets: dict
    canvas: int


def prepare(args, train_images=400):
    """A Prepared (model, datasets, loaders {"val", "train"}, criterion, objectives, S, sets,
    canvas) for a command."""
    import torch

    from fqdetr.engine.loader import make_loader
    from fqdetr.engine.setup import checkpoint_geometry, critical_setup, load_datasets
    from fqdetr.models import load_detr_checkpoint

    if not Path(args.model).exists():
        raise SystemExit(f"--model: {args.model} does not exist")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model = load_detr_checkpoint(args.model).eval()
    val_images = args.eval_images
    image_size, canvas = checkpoint_geometry(args.model, args.image_size)
    data = load_datasets(args.data, image_size, max(train_images, val_images), val_images)
    train_eval = torch.utils.data.Subset(data["train"], range(min(val_images, len(data["train"]))))
    loaders = {"val": make_loader(data["val"], args.batch_size, canvas, shuffle=False),
               "train": make_loader(train_eval, args.batch_size, canvas, shuffle=False)}
    criterion, objectives, S, sets = critical_setup(model, data["val"], args.critical,
                                                    alpha=getattr(args, "alpha", 1.0))
    return Prepared(model, data, loaders, criterion, objectives, S, sets, canvas)
