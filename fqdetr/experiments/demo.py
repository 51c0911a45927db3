"""The main job (``make demo``): docs/METHOD.md sections 1-4 on the built-in dataset and the
shipped detectors (DETR, Deformable DETR), in minutes on a CPU.

Float eval; uniform 4-bit PTQ; Fisher-overall vs Fisher-critical allocations at the same
average-bit budget; short QAT plain / with the Fisher-trace regulariser / with the critical
classes' loss up-weighted; a picture of the float, uniform and Fisher-critical detections on a
few val images. ``run_demo``: one detector, OUT/results.json, OUT/report.md, OUT/detections.png
and PNG plots; ``run_demos``: several, each in OUT/<checkpoint name>/, and one OUT/report.md
with a section per detector.
"""
import copy
import logging
import time
from pathlib import Path

import torch

from fqdetr.allocate import allocate_bits, sensitivities
from fqdetr.data import class_names_of
from fqdetr.data.coco import load_image
from fqdetr.engine.checkpoint import seed_everything
from fqdetr.engine.evaluate import coco_dataset_of, predict
from fqdetr.engine.family import family_of
from fqdetr.engine.loader import make_loader
from fqdetr.engine.qat import qat, upweighted_criterion
from fqdetr.engine.quantize import fixed_bounds, layer_weights, quantize_detr
from fqdetr.engine.setup import checkpoint_geometry, critical_setup, evaluate_splits, load_datasets
from fqdetr.experiments.stopwatch import Stopwatch
from fqdetr.models import load_detr_checkpoint
from fqdetr.models.checkpoint import checkpoint_family, read_checkpoint
from fqdetr.io import atomic_write, atomic_write_text, write_json
from fqdetr.report import DETECTIONS_PICTURE, write_method_report
from fqdetr.sensitivity import fisher_traces
from fqdetr.visualize import draw_detections, side_by_side, stacked

log = logging.getLogger(__name__)

# Detections drawn in the picture: those at least this confident, per classification head.
# DETR's softmax shares each query's mass with the no-object class, so a found object scores
# near 1; the focal loss trains Deformable DETR's independent sigmoids to lower scores (the best
# detections of a deformable_tiny after 2 epochs score 0.3-0.37), and 0.5 would hide them all.
PICTURE_SCORE = {"softmax": 0.5, "sigmoid": 0.3}
PICTURE_METHODS = ("float", "ptq uniform w4a8", "ptq fisher-critical")
# The demo's sizes per detector family (fqdetr.models.checkpoint_family), so that both shipped
# detectors run in the 6 minutes on 2 cores. DETR's are those the README's numbers were
# measured with. The regularised QAT steps dominate each section: in `make demo` (2 threads,
# 2026-12-06, docs/demo/*/results.json "timings") DETR's 40 took 154 s of its 224 s. The shipped
# Deformable DETR (2.22 M, box refinement) costs 2.3x the 0.98 M one it replaced per forward +
# backward (batch 8, 1 thread: 900 against 394 ms), 5.3 s per regularised step; at 8 QAT steps its
# section took 110 s (42 s the regularised steps), both 340 s; at 20 it would pass 6 minutes.
DEMO_SIZES = {"detr": {"qat_steps": 40, "fisher_images": 48, "eval_images": 120},
              "deformable_detr": {"qat_steps": 8, "fisher_images": 48, "eval_images": 120}}


def _data(model_path, data_dir, image_size, eval_images, fisher_images, batch_size, seed):
    """(datasets, evaluation loaders {"val", "train" (its first eval_images)}, Fisher and
    calibration loader (first fisher_images training images), shuffled QAT loader, canvas),
    every image padded to the model's canvas."""
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
    qat_loader = make_loader(data["train"], batch_size, canvas, shuffle=True, seed=seed)
    return data, loaders, fisher_loader, qat_loader, canvas


def _ptq_arms(model, fisher_loader, loaders, objectives, sets, budget_avg_bits, timer):
    """Uniform PTQ, then Fisher-overall and Fisher-critical allocations at the uniform model's
    size. Returns ({method: evaluation}, {method: quantized model}, what results.json records of
    the traces and allocations)."""
    methods, models = {}, {}
    with timer.stage("ptq uniform: calibrate"):
        models["ptq uniform w4a8"] = quantize_detr(model, w_bits=int(budget_avg_bits), calib_loader=fisher_loader)
    with timer.stage("ptq uniform: eval"):
        methods["ptq uniform w4a8"] = evaluate_splits(models["ptq uniform w4a8"], loaders, sets)
    traces = {}
    for name in ("overall", "critical"):
        with timer.stage(f"fisher traces {name}"):
            traces[name] = fisher_traces(copy.deepcopy(models["ptq uniform w4a8"]), fisher_loader, objectives[name],
                                         progress=False)
    weights, bounds = layer_weights(models["ptq uniform w4a8"]), fixed_bounds(models["ptq uniform w4a8"])
    sizes = {n: w.numel() for n, w in weights.items()}
    # The size of the uniform model: budget_avg_bits everywhere but the 8-bit first conv and heads,
    # so every allocation is compared at exactly the uniform PTQ model's size.
    allocations = {"uniform": {n: 8 if n in bounds else int(budget_avg_bits) for n in sizes}}
    budget = sum(sizes[n] * b for n, b in allocations["uniform"].items())
    for name in ("overall", "critical"):
        method = f"ptq fisher-{name}"
        allocations[f"fisher-{name}"] = allocate_bits(sensitivities(weights, traces[name]), sizes, budget,
                                                      bounds=bounds)
        with timer.stage(f"{method}: calibrate"):
            models[method] = quantize_detr(model, allocation=allocations[f"fisher-{name}"],
                                           calib_loader=fisher_loader)
        with timer.stage(f"{method}: eval"):
            methods[method] = evaluate_splits(models[method], loaders, sets)
    record = dict(traces=traces, allocations=allocations, sizes=sizes, budget_bits=budget,
                  budget_avg_bits_all_layers=budget / sum(sizes.values()))
    return methods, models, record


def _qat_arms(start_point, criterion, objectives, S, qat_loader, loaders, sets, opts, timer):
    """The three QAT variants from ``start_point`` (each from the same seed); {method: evaluation
    with "final_loss"}."""
    variants = {"qat": {}, "qat + fisher-trace reg": {"reg_lambda": opts["reg_lambda"]},
                "qat + critical up-weighted": {"criterion": upweighted_criterion(criterion, S, opts["upweight"])}}
    methods = {}
    for name, variant in variants.items():
        q = copy.deepcopy(start_point)
        seed_everything(opts["seed"])
        with timer.stage(f"{name}: {opts['qat_steps']} steps"):
            history = qat(q, variant.get("criterion", criterion), qat_loader, opts["qat_steps"],
                          critical_objective=objectives["critical"], reg_lambda=variant.get("reg_lambda", 0.0),
                          progress=True)
        with timer.stage(f"{name}: eval"):
            methods[name] = evaluate_splits(q, loaders, sets)
        methods[name]["final_loss"] = history[-1]["loss"] if history else None
    return methods


def draw_comparison(models, dataset, canvas, critical_labels, count, path, score_threshold):
    """Writes to ``path`` a picture of the first ``count`` images of ``dataset``, a row each: every
    model of ``models`` {title: model} side by side, its detections scoring >= score_threshold
    drawn on the original image (critical classes in their own colour). Returns ``path``."""
    subset = torch.utils.data.Subset(dataset, range(min(count, len(dataset))))
    coco = coco_dataset_of(subset)
    loader = make_loader(subset, len(subset), canvas, shuffle=False)
    predictions = {title: predict(m, loader)[:2] for title, m in models.items()}
    rows = []
    for i, image_id in enumerate(next(iter(predictions.values()))[1]):
        image = load_image(coco.image_path(image_id))
        drawn = [draw_detections(image, p[i]["boxes"], p[i]["labels"], p[i]["scores"], coco.label_names,
                                 critical_labels=critical_labels, score_threshold=score_threshold)
                 for p, _ in predictions.values()]
        rows.append(side_by_side(drawn, list(predictions)))
    picture = stacked(rows)
    atomic_write(path, lambda f: picture.save(f, format="PNG"))
    return path


def _picture(models, dataset, canvas, critical_labels, count, out_dir):
    """OUT/detections.png of PICTURE_METHODS (``models`` {method: model}) on the first ``count``
    images of ``dataset``; returns what results.json records of it."""
    threshold = PICTURE_SCORE[family_of(models["float"]).head]
    draw_comparison({m: models[m] for m in PICTURE_METHODS}, dataset, canvas, critical_labels, count,
                    Path(out_dir) / DETECTIONS_PICTURE, threshold)
    return {"file": DETECTIONS_PICTURE, "methods": list(PICTURE_METHODS), "score_threshold": threshold,
            "images": min(count, len(dataset))}


def demo_sizes(model_path, qat_steps=None, fisher_images=None, eval_images=None):
    """{"qat_steps", "fisher_images", "eval_images"}: each the value given, else (None) the one
    DEMO_SIZES gives the checkpoint's family."""
    given = {"qat_steps": qat_steps, "fisher_images": fisher_images, "eval_images": eval_images}
    family_sizes = DEMO_SIZES[checkpoint_family(read_checkpoint(model_path)["model"])]
    return {k: family_sizes[k] if v is None else v for k, v in given.items()}


def run_demo(out_dir, model_path, data_dir, critical="person", budget_avg_bits=4.0, qat_steps=None,
             fisher_images=None, eval_images=None, batch_size=8, reg_lambda=0.05, upweight=3.0, image_size=None,
             seed=0, pictures=4):
    """Runs the whole comparison and writes the report; returns the results dict (its
    "timings": each arm's wall and CPU seconds). qat_steps, fisher_images, eval_images: None
    takes the family's DEMO_SIZES. ``pictures``: val images in detections.png (0: no picture)."""
    sizes = demo_sizes(model_path, qat_steps=qat_steps, fisher_images=fisher_images, eval_images=eval_images)
    qat_steps, fisher_images, eval_images = sizes["qat_steps"], sizes["fisher_images"], sizes["eval_images"]
    seed_everything(seed)
    start, out_dir, timer = time.time(), Path(out_dir), Stopwatch()
    out_dir.mkdir(parents=True, exist_ok=True)
    with timer.stage("data"):
        data, loaders, fisher_loader, qat_loader, canvas = _data(model_path, data_dir, image_size, eval_images,
                                                                 fisher_images, batch_size, seed)
    model = load_detr_checkpoint(model_path).eval()
    criterion, objectives, S, sets = critical_setup(model, data["val"], critical)
    results = {"config": {"critical": critical, "critical_labels": S, "budget_avg_bits": budget_avg_bits,
                          "qat_steps": qat_steps, "fisher_images": fisher_images, "eval_images": eval_images,
                          "seed": seed, "model": str(model_path), "detector": family_of(model).title},
               "methods": {}}
    with timer.stage("float: eval"):
        results["methods"]["float"] = evaluate_splits(model, loaders, sets)
    methods, models, record = _ptq_arms(model, fisher_loader, loaders, objectives, sets, budget_avg_bits, timer)
    results["methods"].update(methods)
    results.update(record)
    if pictures:
        with timer.stage("detections picture"):
            results["detections_picture"] = _picture(dict(models, float=model), data["val"], canvas, S, pictures,
                                                     out_dir)
    with timer.stage("qat start point: calibrate"):
        start_point = quantize_detr(model, allocation=record["allocations"]["fisher-critical"],
                                    calib_loader=fisher_loader)
    results["methods"].update(_qat_arms(start_point, criterion, objectives, S, qat_loader, loaders, sets,
                                        dict(qat_steps=qat_steps, reg_lambda=reg_lambda, upweight=upweight,
                                             seed=seed), timer))
    results["seconds"], results["timings"] = time.time() - start, timer.stages
    write_method_report(results, out_dir)
    log.info("demo finished in %.0f s; report in %s", results["seconds"], out_dir / "report.md")
    return results
def _section(name, results, report_path):
    """The per-model report as a section of the combined one: its title a level down, its
    plots linked through the model's folder."""
    body = Path(report_path).read_text().split("\n", 1)[1]
    for plot in ("layers.png", "groups.png", DETECTIONS_PICTURE):
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
