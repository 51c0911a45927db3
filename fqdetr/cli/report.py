"""``fqdetr report``: re-renders the method report (table and plots) from results.json."""


def add_parser(subparsers):
    p = subparsers.add_parser(
        "report", help="render report.md and PNG plots from a demo/experiment results.json",
        description="Reads results.json written by 'fqdetr demo' and writes report.md, layers.png and groups.png "
                    "next to it (or into --out).")
    p.add_argument("results", help="results.json")
    p.add_argument("--out", default=None, help="output folder (default: the results file's folder)")
    p.set_defaults(func=run)


def run(args):
    import json
    from pathlib import Path

    from fqdetr.report import write_method_report

    path = Path(args.results)
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"results: cannot read {path}: {err}") from err
    for key in ("config", "methods", "traces", "allocations", "sizes"):
        if key not in results:
            raise ValueError(f"results: {path} has no '{key}' entry (not a demo results.json)")
    print(f"wrote {write_method_report(results, args.out or path.parent)}")
    return 0
