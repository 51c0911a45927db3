"""The main job (``make demo``): docs/METHOD.md sections 1-4 on the built-in dataset and the
shipped detectors (DETR, Deformable DETR), in minutes on a CPU.

Float eval; uniform 4-bit PTQ; Fisher-overall vs Fisher-critical allocations at the same
average-bit budget; short QAT plain / with the Fisher-trace regulariser / with the critical
classes' loss up-weighted. ``run_demo``: one detector, OUT/results.json, OUT/report.md and PNG
plots; ``run_demos``: several, each in OUT/<checkpoint name>/, and one OUT/report.md with a
section per detector.
"""
import copy
import logging
import time
from pathlib import Path

import torch

from fqdetr.allocate import allocate_bits, sensitivities
from fqdetr.data import class_names_of
from fqdetr.engine.checkpoint import seed_everything
from fqdetr.engine.family import family_of
from fqdetr.engine.loader import make_loader
from fqdetr.engine.qat import qat, upweighted_criterion
from fqdetr.engine.quantize import fixed_bounds, layer_weights, quantize_detr
from fqdetr.engine.setup import checkpoint_geometry, critical_setup, evaluate_splits, load_datasets
from fqdetr.models import load_detr_checkpoint
from fqdetr.models.checkpoint import read_checkpoint
from fqdetr.io import atomic_write_text, write_json
from fqdetr.report import write_method_report
from fqdetr.sensitivity import fisher_traces

log = logging.getLogger(__name__)


def _data(model_path, data_dir, image_size, eval_images, fisher_images, batch_size, seed):
    """(datasets, evaluation loaders {"val", "train" (its first eval_images)}, Fisher and
    calibration loader (first fisher_images training images), shuffled QAT loader), every image
    padded to the model's canvas."""
    image_size, canvas = checkpoint_geometry(model_path, image_size)
    data = load_datasets(data_dir, image_size, max(eval_images, fisher_images, 400), eval_images,
                         class_names=class_names_of(read_checkpoint(model_path)))
    # the first eval_images of each split, also from a dataset that holds more of them
    val_subset, train_subset = (torch.utils.data.Subset(data[split], range(min(eval_images, len(data[split]))))
                                for split in ("val", "train"))
    loaders = {"val": make_loader(val_subset, batch_size, canvas, shuffle=False),
               "train": make_loader(train_subset, batch_size, canvas, shuffle=False)}
    fisher_loader = make_loader(torch.utils.data.Subset(data["train"], range(fisher_images)), batch_size,
                                canvas, shuffle=False)
    return data, loaders, fisher_loader, make_loader(data["train"], batch_size, canvas, shuffle=True, seed=seed)


def run_demo(out_dir, model_path, data_dir, critical="person", budget_avg_bits=4.0, qat_steps=40,
             fisher_images=48, eval_images=120, batch_size=8, reg_lambda=0.05, upweight=3.0, image_size=None,
             seed=0):
    """Runs the whole comparison and writes the report; returns the results dict."""
    seed_everything(seed)
    start, out_dir = time.time(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, loaders, fisher_loader, qat_loader = _data(model_path, data_dir, image_size, eval_images, fisher_images,
                                                     batch_size, seed)
    model = load_detr_checkpoint(model_path).eval()
    criterion, objectives, S, sets = critical_setup(model, data["val"], critical)
    results = {"config": {"critical": critical, "critical_labels": S, "budget_avg_bits": budget_avg_bits,
                          "qat_steps": qat_steps, "fisher_images": fisher_images, "seed": seed,
                          "model": str(model_path), "detector": family_of(model).title}, "methods": {}}
    results["methods"]["float"] = evaluate_splits(model, loaders, sets)
    uniform = quantize_detr(model, w_bits=int(budget_avg_bits), calib_loader=fisher_loader)
    results["methods"]["ptq uniform w4a8"] = evaluate_splits(uniform, loaders, sets)
    traces = {name: fisher_traces(copy.deepcopy(uniform), fisher_loader, objectives[name], progress=False)
              for name in ("overall", "critical")}
    weights, bounds = layer_weights(uniform), fixed_bounds(uniform)
    sizes = {n: w.numel() for n, w in weights.items()}
    # The size of the uniform model: budget_avg_bits everywhere but the 8-bit first conv and heads,
    # so every allocation is compared at exactly the uniform PTQ model's size.
    allocations = {"uniform": {n: 8 if n in bounds else int(budget_avg_bits) for n in sizes}}
    budget = sum(sizes[n] * b for n, b in allocations["uniform"].items())
    for name in ("overall", "critical"):
        allocations[f"fisher-{name}"] = allocate_bits(sensitivities(weights, traces[name]), sizes, budget,
                                                      bounds=bounds)
        q = quantize_detr(model, allocation=allocations[f"fisher-{name}"], calib_loader=fisher_loader)
        results["methods"][f"ptq fisher-{name}"] = evaluate_splits(q, loaders, sets)
    results.update(traces=traces, allocations=allocations, sizes=sizes,
                   budget_bits=budget, budget_avg_bits_all_layers=budget / sum(sizes.values()))
    start_point = quantize_detr(model, allocation=allocations["fisher-critical"], calib_loader=fisher_loader)
    variants = {"qat": {}, "qat + fisher-trace reg": {"reg_lambda": reg_lambda},
                "qat + critical up-weighted": {"criterion": upweighted_criterion(criterion, S, upweight)}}
    for name, opts in variants.items():
        q = copy.deepcopy(start_point)
        seed_everything(seed)
        history = qat(q, opts.get("criterion", criterion), qat_loader, qat_steps,
                      critical_objective=objectives["critical"], reg_lambda=opts.get("reg_lambda", 0.0),
                      progress=True)
        results["methods"][name] = evaluate_splits(q, loaders, sets)
        results["methods"][name]["final_loss"] = history[-1]["loss"] if history else None
    results["seconds"] = time.time() - start
    write_method_report(results, out_dir)
    log.info("demo finished in %.0f s; report in %s", results["seconds"], out_dir / "report.md")
    return results


def _section(name, results, report_path):
    """The per-model report as a section of the combined one: its title a level down, its
    plots linked through the model's folder."""
    body = Path(report_path).read_text().split("\n", 1)[1]
    for plot in ("layers.png", "groups.png"):
        body = body.replace(f"]({plot})", f"]({name}/{plot})")
    return f"## {results['config']['detector']}: `{name}`\n{body}"


def run_demos(out_dir, model_paths, data_dir, **options):
    """run_demo for each checkpoint of ``model_paths`` (DETR or Deformable DETR), each in
    OUT/<file name without .pth>/, then OUT/report.md with one section per detector and
    OUT/results.json {name: results}. A single checkpoint writes straight into OUT, as run_demo.
    Returns {name: results}."""
    paths = [Path(p) for p in model_paths]
    if not paths:
        raise ValueError("--model: no checkpoint given and no shipped model found")
    names = [p.stem for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"--model: two checkpoints share a file name ({names}); their folders would clash")
    out_dir = Path(out_dir)
    if len(paths) == 1:
        return {names[0]: run_demo(out_dir, paths[0], data_dir, **options)}
    everything = {name: run_demo(out_dir / name, path, data_dir, **options) for name, path in zip(names, paths)}
    sections = [_section(name, results, out_dir / name / "report.md") for name, results in everything.items()]
    write_json(everything, out_dir / "results.json")
    atomic_write_text(out_dir / "report.md", "# Fisher-aware quantization: demo report\n\n" + "\n".join(sections))
    log.info("demo of %d detectors finished; report in %s", len(paths), out_dir / "report.md")
    return everything
