"""How much of a Deformable DETR training step is the multi-scale deformable sampling?

Issue 13 asks for a compiled CPU kernel of the attention core (bilinear sampling of the values,
weighted by the attention weights: ``ms_deform_attn_sample``) only if it dominates a training
step. This measures its share on the whole model: one float training step (forward, loss with
Hungarian matching, backward; BatchNorm frozen as in the benchmarks) records the shapes of
every call of the core; then, in interleaved rounds, the step and the core's forward + backward
at exactly those shapes (random values, locations and weights) are timed. Share = the core's
summed time over the step's time in the same round; medians over rounds. A kernel that removed
the core entirely could speed a step up by at most 1 / (1 - share) (Amdahl).

Run:  python benchmarks/deformable_sampling_share.py --case deformable_tiny --threads 2
      python benchmarks/deformable_sampling_share.py --case deformable_r50 --rounds 1
Results: benchmarks/RESULTS.md, "Deformable sampling share".
"""
import argparse
import statistics
import time
from unittest import mock

import torch

import bench_e2e
from fqdetr.models.deformable import ms_deform_attn as msda


def recorded_calls(c):
    """[(value shape, spatial shapes, locations shape)] of every core call in one forward."""
    calls, core = [], msda.ms_deform_attn_sample

    def record(value, shapes, locations, weights):
        calls.append((tuple(value.shape), [tuple(int(x) for x in s) for s in shapes], tuple(locations.shape)))
        return core(value, shapes, locations, weights)

    with mock.patch.object(msda, "ms_deform_attn_sample", record):
        bench_e2e._loss(c, c["float"])
    return calls


def core_step(calls):
    """Forward + backward of the core at every recorded shape, inputs drawn once."""
    inputs = []
    for value, shapes, locations in calls:
        inputs.append((torch.randn(value, requires_grad=True), shapes, torch.rand(locations, requires_grad=True),
                       torch.rand(locations[:-1], requires_grad=True)))

    def run():
        for value, shapes, locations, weights in inputs:
            out = msda.ms_deform_attn_sample(value, shapes, locations, weights)
            out.backward(torch.ones_like(out))
    return run


def timed(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["deformable_tiny", "deformable_r50"], default="deformable_tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    c = bench_e2e.build_case(bench_e2e.CASE_OPTIONS[args.case], quantized=False)
    model = c["float"]

    def step():
        model.zero_grad(set_to_none=True)
        bench_e2e._loss(c, model).backward()

    calls = recorded_calls(c)
    core = core_step(calls)
    step(), core()  # warm-up
    shares, steps = [], []
    for _ in range(args.rounds):
        t_step, t_core = timed(step), timed(core)
        steps.append(t_step)
        shares.append(t_core / t_step)
    share = statistics.median(shares)
    print(f"{bench_e2e.CASE_OPTIONS[args.case]}, {args.threads} thread(s), {args.rounds} round(s): float step "
          f"{statistics.median(steps) * 1e3:.0f} ms; {len(calls)} core calls; sampling core (forward + backward) "
          f"{share:.1%} of the step (rounds: {', '.join(f'{s:.1%}' for s in shares)}); a kernel that removed it "
          f"entirely: at most {1 / (1 - share):.2f}x faster steps")


if __name__ == "__main__":
    main()
