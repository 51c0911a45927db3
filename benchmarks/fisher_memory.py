"""Peak memory of per-sample Fisher collection versus batch size N, one process per case
(the peak resident set, ru_maxrss, is per process and never goes down).

    .venv/bin/python benchmarks/fisher_memory.py [FILTER]   # markdown table on stdout

Each child builds the case, records its resident set after building (model + inputs),
runs one forward + backward (+ Fisher) twice and reports its peak; the table shows the
peak growth over that starting point, in MiB. Cases and methods: bench_fisher.py.
"""
import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWEEPS = {  # case template: (kind, Ns)
    "linear (N,850,256)->2048": ("linear", [1, 4, 16, 64]),
    "encoder layer (850 tokens, d=256, FFN 2048)": ("encoder", [1, 4, 16, 32]),
    "conv3x3 64ch 200x267": ("conv", [1, 2, 4]),
    # Small activations, big weights: here the per-sample gradients (16 MiB each) dominate.
    "linear (N,4,2048)->2048": ("linear2048", [1, 8, 32, 128]),
}
METHODS = ["floor", "ours", "torch.func", "backpack", "opacus"]


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def child(kind, n, method):
    import pytest
    import torch

    sys.path.insert(0, str(HERE))
    import bench_fisher as bf

    import fqkernels as fk

    # Same preloaded modules in every child: the custom op's first call imports torch._dynamo
    # (~150 MiB), which is import cost, not the method's working memory.
    fk.per_sample_fisher(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    torch.manual_seed(0)
    builders = {"linear": lambda: bf.linear_case(n, 850, 256, 2048), "encoder": lambda: bf.encoder_case(n),
                "conv": lambda: bf.conv_case(n), "linear2048": lambda: bf.linear_case(n, 4, 2048, 2048)}
    bf.CASES = {"case": (builders[kind], "linear" if kind == "linear2048" else kind)}
    try:
        run = bf.make_runner("case", method)
    except pytest.skip.Exception as e:
        print(json.dumps({"skip": str(e)}))
        return
    start = _rss_mib()
    run()
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"start": start, "peak": peak}))


def main(only=""):
    rows = []
    sweeps = {case: v for case, v in SWEEPS.items() if only in case}
    for case, (kind, ns) in sweeps.items():
        for method in METHODS:
            cells = []
            for n in ns:
                out = subprocess.run([sys.executable, __file__, kind, str(n), method], capture_output=True, text=True)
                try:
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    res = {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
                cells.append("n/a" if "skip" in res else "error" if "error" in res
                             else f"{res['peak'] - res['start']:.0f}")
                print(case, method, n, res, file=sys.stderr, flush=True)
            rows.append((case, method, ns, cells))
    for case, (_, ns) in sweeps.items():
        print(f"\n{case}: peak memory growth (MiB) over model + inputs\n")
        print("| method | " + " | ".join(f"N={n}" for n in ns) + " |")
        print("|---|" + "---|" * len(ns))
        for c, method, _, cells in rows:
            if c == case:
                print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) == 4:
        child(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    else:
        main(sys.argv[1] if len(sys.argv) == 2 else "")
