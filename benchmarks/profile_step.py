"""Where a whole-model step's time goes, operator by operator (issue 14's profiles in
benchmarks/RESULTS.md): torch.profiler's self-CPU table of bench_e2e's runners.

    python benchmarks/profile_step.py --case tiny --threads 2 float ours fisher
    python benchmarks/profile_step.py --case r50 --threads 1 float ours fisher

float / ours: a training step (forward, DETR loss, backward, AdamW) of the float / W4A8 model;
fisher: FisherCollector on the W4A8 model (no optimizer step); infer-float / infer-ours: an
inference forward of the float model / of the W4A8 model in inference mode (integer kernels,
cached weight codes), as bench_e2e's "inference forward" row. Each: 3 warm-up steps, then
``--steps`` profiled ones; divide the table's totals by --steps for per-step times.
"""
import argparse
import functools

import torch

import bench_e2e


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="+", choices=["float", "ours", "fisher", "infer-float", "infer-ours"])
    p.add_argument("--case", choices=sorted(bench_e2e.CASE_OPTIONS), default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=28, help="operators listed per method (default 28)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    c = bench_e2e.build_case(bench_e2e.CASE_OPTIONS[args.case])
    runs = {"float": bench_e2e.train_step_runner(c, c["float"]), "ours": bench_e2e.train_step_runner(c, c["quant"]),
            "fisher": bench_e2e.fused_fisher_runner(c),
            "infer-float": functools.partial(bench_e2e.forward_runner(c["float"]), c),
            "infer-ours": functools.partial(bench_e2e.forward_runner(c["quant"], integer=True), c)}
    for name in args.methods:
        for _ in range(3):
            runs[name]()
        with torch.profiler.profile() as prof:
            for _ in range(args.steps):
                runs[name]()
        print(f"===== {name} ({args.case}, {args.threads} threads, {args.steps} steps)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
