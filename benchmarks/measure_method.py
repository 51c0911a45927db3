"""Measurements behind two of the method's defaults (docs/METHOD.md sections 2.4 and 4.2), on
the shipped DETR quantized W4A8 (calibrated on the first 4 batches), critical set ``person``.

    python benchmarks/measure_method.py normalizer  [--images 48]
        How much of tr(F) the 10% of images with the fewest objects carry, under the fixed and
        the per-image normaliser, and how many layers the --budget 4 allocation changes.
    python benchmarks/measure_method.py regularizer [--images 48] [--rounds 3]
        The regulariser's estimators ("batch", "per-sample") against the exact tr(F_crit) of the
        Fisher collector, batch by batch (batches of 8), and each one's QAT step time against a
        plain QAT step (interleaved in this process, 1 thread).
    python benchmarks/measure_method.py hessian [--images 200] [--probes 2]
        Why the "hessian" arm of the study collapses: the Hutchinson traces (overall objective) of
        the same quantized model from two independent probe seeds, and of the float model (the same
        modules with fake quant off, HAWQ's choice): how many layers come out negative, and how
        many change sign between the two probe seeds (estimator noise, not curvature).

Prints one JSON object. Wall times depend on the machine's load: read the ratios.
"""
import argparse
import copy
import json
import math
import os
import time
import unittest.mock

import torch

from fqdetr.allocate import allocate_bits, sensitivities
from fqdetr.engine.loader import make_loader
from fqdetr.engine.qat import qat
from fqdetr.engine.quantize import fixed_bounds, layer_weights, quantize_detr
from fqdetr.engine.setup import checkpoint_geometry, critical_setup, load_datasets
from fqdetr.models import load_detr_checkpoint
from fqdetr.quant import quantized_weights
from fqdetr.regularize import FisherTraceRegularizer
from fqdetr.sensitivity import fisher_traces, hutchinson_traces

MODEL = "models/detr_tiny_builtin.pth"
CANDIDATES = (2, 3, 4, 5, 6, 8)


def setup(images, batch_size=8, data="data/builtin"):
    """(quantized model, {normalizer: objectives}, criterion, loader of the first ``images`` training images)."""
    image_size, canvas = checkpoint_geometry(MODEL)
    model = load_detr_checkpoint(MODEL).eval()
    train = load_datasets(data, image_size)["train"]
    subset = torch.utils.data.Subset(train, range(images))
    loader = make_loader(subset, batch_size, canvas, shuffle=False)
    qmodel = quantize_detr(model, w_bits=4, calib_loader=loader)
    objectives = {}
    for normalizer in ("fixed", "per_image"):
        criterion, objectives[normalizer], _, _ = critical_setup(qmodel, train, "person", normalizer=normalizer)
    return qmodel, objectives, criterion, loader


def _sq_grad_norms(model, objective, images, mask, targets):
    """{layer: [B] ||d l_n / d W_l||^2}, one autograd pass per image (the Fisher's per-sample terms)."""
    weights = {n: w for n, (w, _) in quantized_weights(model).items()}
    losses = objective(model((images, mask)), targets)
    out = {n: torch.zeros(len(targets)) for n in weights}
    for i in range(len(targets)):
        grads = torch.autograd.grad(losses[i], list(weights.values()), retain_graph=i < len(targets) - 1)
        for n, g in zip(weights, grads):
            out[n][i] = float(g.double().square().sum())
    return out


def _allocation(model, traces):
    weights = layer_weights(model)
    sizes = {n: w.numel() for n, w in weights.items()}
    return allocate_bits(sensitivities(weights, traces, CANDIDATES), sizes, {"avg_bits": 4.0}, CANDIDATES,
                         bounds=fixed_bounds(model))


def measure_normalizer(images):
    model, objectives, _, loader = setup(images)
    result, allocations = {}, {}
    for normalizer, objs in objectives.items():
        for name in ("overall", "critical"):
            per_layer, counts = {}, []
            for batch_images, mask, targets in loader:
                for n, v in _sq_grad_norms(model, objs[name], batch_images, mask, targets).items():
                    per_layer.setdefault(n, []).append(v)
                counts += [len(t["labels"]) for t in targets]
            per_layer = {n: torch.cat(v) for n, v in per_layer.items()}
            per_image_total = sum(per_layer.values())
            fewest = torch.tensor(counts, dtype=torch.float64).argsort(stable=True)[:math.ceil(0.1 * len(counts))]
            allocations[normalizer, name] = _allocation(model, {n: float(v.mean()) for n, v in per_layer.items()})
            result[f"{normalizer}/{name}"] = {
                "share_of_trace_fewest_10pct": float(per_image_total[fewest].sum() / per_image_total.sum()),
                "objects_of_fewest": [counts[i] for i in fewest.tolist()],
                "share_of_objects_fewest_10pct": sum(counts[i] for i in fewest.tolist()) / sum(counts),
                "largest_image_share": float(per_image_total.max() / per_image_total.sum())}
    for name in ("overall", "critical"):
        a, b = allocations["fixed", name], allocations["per_image", name]
        result[f"allocation_layers_changed/{name}"] = sum(a[n] != b[n] for n in a)
    result["images"] = images
    return result


def _regularizer(model, estimator):
    weights, quantizers = zip(*quantized_weights(model).values())
    return FisherTraceRegularizer(weights, estimator, "exact", quantizers=quantizers)


def _pearson(x, y):
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def _spearman(x, y):
    rank = lambda v: torch.tensor(v, dtype=torch.float64).argsort().argsort().double().tolist()  # noqa: E731
    return _pearson(rank(x), rank(y))


def measure_regularizer(images, rounds):
    model, objectives, criterion, loader = setup(images)
    critical = objectives["fixed"]["critical"]
    exact, values = [], {"batch": [], "per-sample": []}
    for batch in loader:
        exact.append(sum(fisher_traces(model, [batch], critical, progress=False).values()))
        images_, mask, targets = batch
        for estimator in values:
            def loss_fn(reduction):
                per_image = critical(model((images_, mask)), targets)
                return per_image.sum() if reduction == "batch" else per_image
            values[estimator].append(_regularizer(model, estimator)(loss_fn).item())
    result = {"images": images, "batches": len(exact), "exact_trace": exact}
    for estimator, v in values.items():
        ratios = [a / b for a, b in zip(v, exact)]
        result[estimator] = {"values": v, "pearson": _pearson(v, exact), "spearman": _spearman(v, exact),
                             "ratio_mean": sum(ratios) / len(ratios), "ratio_min": min(ratios),
                             "ratio_max": max(ratios)}
    result["step_seconds"] = _step_times(model, criterion, critical, loader, rounds)
    return result


def measure_hessian(images, probes):
    """Hutchinson traces of the quantized model (probe seeds 0 and 1) and of the float model,
    unclipped: negative layers, sign flips between the seeds, and the traces themselves."""
    model, objectives, _, loader = setup(images)
    overall = objectives["fixed"]["overall"]
    float_model = copy.deepcopy(model)
    for module in float_model.modules():
        if hasattr(module, "fake_quant_enabled"):
            module.fake_quant_enabled = False
    runs = {"quantized seed 0": (model, 0), "quantized seed 1": (model, 1), "float seed 0": (float_model, 0)}
    traces = {}
    for name, (m, seed) in runs.items():
        with unittest.mock.patch("fqdetr.sensitivity.clip_negative_traces", lambda t: t):  # the raw estimates
            traces[name] = hutchinson_traces(copy.deepcopy(m), loader, overall, probes=probes, seed=seed,
                                             progress=False)
    a, b = traces["quantized seed 0"], traces["quantized seed 1"]
    flips = sorted(n for n in a if (a[n] < 0) != (b[n] < 0))
    return {"images": images, "probes_per_batch": probes, "layers": len(a),
            "negative": {name: sorted(n for n, v in tr.items() if v < 0) for name, tr in traces.items()},
            "sign_flips_between_probe_seeds": flips, "traces": traces}


def _step_times(model, criterion, critical, loader, rounds):
    """{arm: [seconds per QAT step]}: one step of each arm in turn, ``rounds`` times, on copies."""
    arms = {"plain": {}, "batch": {"reg_lambda": 0.1, "reg_estimator": "batch"},
            "per-sample": {"reg_lambda": 0.1, "reg_estimator": "per-sample"}}
    copies = {arm: copy.deepcopy(model) for arm in arms}
    times = {arm: [] for arm in arms}
    for _ in range(rounds):
        for arm, kwargs in arms.items():
            start = time.perf_counter()
            qat(copies[arm], criterion, loader, steps=1, critical_objective=critical, progress=False, **kwargs)
            times[arm].append(time.perf_counter() - start)
    times["ratio_to_plain"] = {arm: min(times[arm]) / min(times["plain"]) for arm in arms}
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["normalizer", "regularizer", "hessian"])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--probes", type=int, default=2, help="hessian: Hutchinson probes per batch (default 2)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.what == "normalizer":
        out = measure_normalizer(args.images)
    elif args.what == "regularizer":
        out = measure_regularizer(args.images, args.rounds)
    else:
        out = measure_hessian(args.images, args.probes)
    out["load_average"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
