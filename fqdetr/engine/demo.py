"""The main job (``make demo``): METHOD.md sections 1-4 on the built-in dataset and the
shipped DETR, in minutes on a CPU.

Float eval; uniform 4-bit PTQ; Fisher-overall vs Fisher-critical allocations at the same
average-bit budget; short QAT plain / with the Fisher-trace regulariser / with the critical
classes' loss up-weighted. Writes OUT/results.json, OUT/report.md and PNG plots.
"""
import copy
import logging
import time
from pathlib import Path

import torch

from fqdetr.allocate import allocate_bits, sensitivities, uniform_allocation
from fqdetr.critical import category_sets
from fqdetr.data import CocoDetection, builtin_paths, make_builtin_dataset, make_transforms
from fqdetr.engine.evaluate import evaluate_model
from fqdetr.engine.loader import make_loader
from fqdetr.engine.qat import qat, upweighted_criterion
from fqdetr.engine.quantize import fixed_bounds, layer_weights, quantize_detr
from fqdetr.models import SetCriterion, build_criterion, load_detr_checkpoint
from fqdetr.report import write_method_report
from fqdetr.sensitivity import detr_objectives, fisher_traces

log = logging.getLogger(__name__)


def _datasets(data_dir, num_train, num_val, image_size):
    data_dir = Path(data_dir)
    if not (data_dir / "annotations" / "instances_val.json").exists():
        log.info("generating the built-in dataset in %s (%d train / %d val images)", data_dir, num_train, num_val)
        make_builtin_dataset(data_dir, num_train=num_train, num_val=num_val, image_size=image_size, seed=0)
    tf = make_transforms("val", scales=[image_size], max_size=image_size * 4 // 3)
    return {split: CocoDetection(*builtin_paths(data_dir, split), transforms=tf) for split in ("train", "val")}


def _evaluate(model, loaders, sets):
    out = {}
    for split, loader in loaders.items():
        r = evaluate_model(model, loader, critical_sets=sets)["result"]
        out[split] = {"mAP": r["overall"]["AP"], "AP50": r["overall"]["AP50"],
                      "critical": {k: v["AP"] for k, v in r["critical"].items()},
                      "per_category": {k: v["AP"] for k, v in r["per_category"].items()}}
    return out


def run_demo(out_dir, model_path, data_dir, critical="person", budget_avg_bits=4.0, qat_steps=60,
             fisher_images=64, eval_images=200, batch_size=8, reg_lambda=0.05, upweight=3.0, image_size=128,
             seed=0):
    """Runs the whole comparison and writes the report; returns the results dict."""
    torch.manual_seed(seed)
    start, out_dir = time.time(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _datasets(data_dir, max(eval_images, fisher_images, 400), eval_images, image_size)
    train_subset = torch.utils.data.Subset(data["train"], range(min(eval_images, len(data["train"]))))
    loaders = {"val": make_loader(data["val"], batch_size, shuffle=False),
               "train": make_loader(train_subset, batch_size, shuffle=False)}
    fisher_loader = make_loader(torch.utils.data.Subset(data["train"], range(fisher_images)), batch_size,
                                shuffle=False)
    qat_loader = make_loader(data["train"], batch_size, shuffle=True, seed=seed)
    model = load_detr_checkpoint(model_path).eval()
    cats = data["val"].coco.loadCats(data["val"].cat_ids)
    S = category_sets(cats, [critical])[critical]
    sets = {critical: critical}
    sets.update({s: s for s in sorted({c["supercategory"] for c in cats})})
    num_classes = model.class_embed.out_features - 1
    criterion = build_criterion(num_classes, dec_layers=model.config.get("dec_layers", 6),
                                aux_loss=model.config.get("aux_loss", True))

    def make_criterion(n):
        return SetCriterion(n, criterion.matcher, criterion.weight_dict, eos_coef=criterion.eos_coef)

    objectives = detr_objectives(criterion, make_criterion, S)
    results = {"config": {"critical": critical, "critical_labels": S, "budget_avg_bits": budget_avg_bits,
                          "qat_steps": qat_steps, "fisher_images": fisher_images, "seed": seed}, "methods": {}}
    results["methods"]["float"] = _evaluate(model, loaders, sets)
    uniform = quantize_detr(model, w_bits=4, calib_loader=fisher_loader)
    results["methods"]["ptq uniform w4a8"] = _evaluate(uniform, loaders, sets)
    traces = {name: fisher_traces(copy.deepcopy(uniform), fisher_loader, objectives[name], progress=False)
              for name in ("overall", "critical")}
    weights, bounds = layer_weights(uniform), fixed_bounds(uniform)
    sizes = {n: w.numel() for n, w in weights.items()}
    budget = {"avg_bits": budget_avg_bits}
    allocations = {"uniform": uniform_allocation(sizes, budget, bounds=bounds)}
    for name in ("overall", "critical"):
        allocations[f"fisher-{name}"] = allocate_bits(sensitivities(weights, traces[name]), sizes, budget,
                                                      bounds=bounds)
        q = quantize_detr(model, allocation=allocations[f"fisher-{name}"], calib_loader=fisher_loader)
        results["methods"][f"ptq fisher-{name}"] = _evaluate(q, loaders, sets)
    results.update(traces=traces, allocations=allocations, sizes=sizes)
    start_point = quantize_detr(model, allocation=allocations["fisher-critical"], calib_loader=fisher_loader)
    variants = {"qat": {}, "qat + fisher-trace reg": {"reg_lambda": reg_lambda},
                "qat + critical up-weighted": {"criterion": upweighted_criterion(criterion, S, upweight)}}
    for name, opts in variants.items():
        q = copy.deepcopy(start_point)
        torch.manual_seed(seed)
        history = qat(q, opts.get("criterion", criterion), qat_loader, qat_steps,
                      critical_objective=objectives["critical"], reg_lambda=opts.get("reg_lambda", 0.0),
                      progress=True)
        results["methods"][name] = _evaluate(q, loaders, sets)
        results["methods"][name]["final_loss"] = history[-1]["loss"] if history else None
    results["seconds"] = time.time() - start
    write_method_report(results, out_dir)
    log.info("demo finished in %.0f s; report in %s", results["seconds"], out_dir / "report.md")
    return results
