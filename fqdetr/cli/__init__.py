"""Command line: ``fqdetr <command> ...`` (also ``python -m fqdetr``).

Each sub-command lives in its own module of this package and exposes
``add_parser(subparsers)``, which registers its arguments and sets ``func``.
argparse is used only inside this package.
"""
import argparse
import importlib
import logging
import sys

# Sub-command modules, in the order ``--help`` lists them.
COMMANDS = ["data", "train", "eval", "fisher", "allocate", "ptq", "qat", "report", "demo", "reproduce"]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fqdetr",
        description="Fisher-aware quantization for DETR detectors with critical-category objectives.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fqdetr.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"fqdetr.cli.{name}":
                raise
            continue  # sub-command not written yet
        module.add_parser(sub)
    return parser


def main(argv=None):
    from fqdetr.cli._common import apply_config

    parser = build_parser()
    args = apply_config(parser, parser.parse_args(argv), argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args) or 0
