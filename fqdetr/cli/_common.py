"""Arguments and set-up shared by the method's sub-commands (fisher, allocate, ptq, qat)."""
import argparse
import json
import math
from pathlib import Path

# fqdetr.data.layout's BUILTIN and DEFAULT_BUILTIN_DIR, spelt out so that building the parser
# (--help) imports no torch; tests/test_cli_input.py checks that they agree.
BUILTIN, DEFAULT_BUILTIN_DIR = "builtin", "data/builtin"

DATA_HELP = (f"dataset folder: DIR/{{train,val}}/ + DIR/annotations/instances_{{train,val}}.json, or COCO "
             f"2017's DIR/{{train,val}}2017/ + DIR/annotations/instances_{{train,val}}2017.json; '{BUILTIN}' or "
             f"the default {DEFAULT_BUILTIN_DIR} generate the built-in dataset there when missing")
# Inside the package, so that it is installed with it (setup.py package_data); in the source tree
# fqdetr/shipped_models links to models/.
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "shipped_models" / "detr_tiny_builtin.pth"


def add_common(p, data=True):
    """--config, --model, --out and (with ``data``) the dataset arguments."""
    p.add_argument("--config", metavar="FILE", help="JSON or YAML file of defaults for these options "
                                                    "(keys are the option names with '_'); flags override it")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="DETR or Deformable DETR checkpoint (default: the shipped DETR)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder for the outputs")
    if data:
        g = p.add_argument_group("data")
        g.add_argument("--data", default=DEFAULT_BUILTIN_DIR, help=DATA_HELP)
        g.add_argument("--image-size", type=positive_int, default=None,
                       help="shorter image side (default: the checkpoint's training size, else 128)")
        g.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (default 8)")
        g.add_argument("--eval-images", type=positive_int, default=200,
                       help="val images (and as many training images) evaluated (default 200)")
        g.add_argument("--critical", default="person",
                       help="critical set: a supercategory, a category name, or names joined by '+'")
        g.add_argument("--critical-mode", default="lse", choices=["lse", "max", "drop", "matched", "contrast"],
                       help="critical objective (docs/METHOD.md section 1.4; default lse)")


def load_config_file(path):
    """A dict of option values from JSON or YAML (safe loader only), keys with '_'."""
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # OSError, UnicodeDecodeError, JSON and YAML errors
        raise ValueError(f"--config: cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _config_path(argv):
    """The value of --config in ``argv`` (--config FILE or --config=FILE), else None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _config_tokens(action, value, path):
    """The command-line tokens that give ``action`` the config file's ``value``."""
    flag = action.option_strings[-1]
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise ValueError(f"--config: {path}: {action.dest} expects true or false, got {value!r}")
        return [flag] if value != action.default else []
    if isinstance(value, (list, tuple)) and action.nargs in ("+", "*"):
        return [flag, *(str(v) for v in value)]
    if isinstance(value, (dict, list, tuple)) or value is None:
        raise ValueError(f"--config: {path}: {action.dest} expects one value, got {value!r}")
    return [flag, str(value)]


def with_config(parser, argv):
    """``argv`` with the options of its --config file inserted right after the sub-command:
    argparse then checks them (types, choices, ranges) like options typed on the line, and
    an option given on the line still wins (it comes later)."""
    path = _config_path(argv)
    command = next((i for i, arg in enumerate(argv) if arg in parser.commands), None)
    if path is None or command is None:
        return argv
    actions = {a.dest: a for a in parser.commands[argv[command]]._actions if a.option_strings}
    values = load_config_file(path)
    unknown = sorted((set(values) - set(actions)) | (set(values) & {"config", "help", "debug"}))
    if unknown:
        raise ValueError(f"--config: unknown options {unknown} in {path}")
    tokens = [t for key, value in values.items() for t in _config_tokens(actions[key], value, path)]
    return argv[:command + 1] + tokens + argv[command + 1:]


def positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def bit_width(text):
    """argparse type: a bit-width the quantizers support, 2..8."""
    value = int(text)
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"expected a bit-width in 2..8, got {value}")
    return value


def bit_widths(text):
    """argparse type: comma-separated bit-widths, each in 2..8."""
    return tuple(bit_width(part) for part in text.split(","))


def int_list(text):
    """argparse type: comma-separated integers."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def non_negative_float(text):
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def positive_float(text):
    """argparse type: a finite float > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def read_json_option(path, option):
    """The JSON object in file ``path`` given to ``option`` (e.g. "--allocation"); a clear
    ValueError naming both when it is missing, unreadable or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:  # missing, a directory, not UTF-8, invalid JSON
        raise ValueError(f"{option}: cannot read {path} as JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{option}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def prepare(args, train_images=400):
    """fqdetr.engine.setup.prepare_run with a command's parsed arguments (--model, --data, --out,
    --image-size, --batch-size, --eval-images, --critical, and --alpha where it has one)."""
    from fqdetr.engine.setup import prepare_run

    critical_options = {"alpha": args.alpha} if hasattr(args, "alpha") else {}
    critical_options["mode"] = args.critical_mode
    return prepare_run(args.model, args.data, args.out, image_size=args.image_size, batch_size=args.batch_size,
                       eval_images=args.eval_images, critical=args.critical, train_images=train_images,
                       **critical_options)
