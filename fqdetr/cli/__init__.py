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
COMMANDS = ["data", "train", "eval", "fisher", "allocate", "ptq", "qat", "export", "detect", "report", "demo",
            "reproduce"]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fqdetr",
        description="Fisher-aware quantization for DETR detectors with critical-category objectives.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fqdetr.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"fqdetr.cli.{name}":
                raise
            continue  # sub-command not written yet
        module.add_parser(sub)
        # SUPPRESS: a sub-parser's own default would overwrite a --debug given before the command.
        sub.choices[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                       help="show the traceback of an error")
    parser.commands = sub.choices  # {name: sub-parser}, for fqdetr.cli._common.with_config
    return parser


def _error_line(err):
    """One line for an error: bad input (ValueError, OSError) as its message, anything else
    with its type, since that is likely a bug."""
    text = " ".join(str(err).split())
    if isinstance(err, (ValueError, OSError)):
        return text
    return f"{type(err).__name__}: {text} (--debug shows the traceback)"


def main(argv=None):
    """Runs ``fqdetr ARGV``; returns the exit code: 0, or 2 with a one-line message on
    stderr for an error (``--debug`` raises it instead, with its traceback)."""
    from fqdetr.cli._common import with_config

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    try:
        argv = with_config(parser, argv)
    except ValueError as err:
        if "--debug" in argv:
            raise
        print(f"fqdetr: error: {_error_line(err)}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except Exception as err:
        if args.debug:
            raise
        print(f"fqdetr {args.command}: error: {_error_line(err)}", file=sys.stderr)
        return 2
