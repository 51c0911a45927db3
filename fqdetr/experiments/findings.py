"""Reproduction of docs/METHOD.md section 6, findings 1-4, over several seeds.

Each seed runs the demo pipeline (fqdetr.experiments.demo.run_demo) and, for finding 1, the
per-category sensitivity study: the Fisher trace of each category's critical objective
against its AP drop under uniform low-bit PTQ. Verdicts are computed from means and
spreads over seeds; nothing is tuned to make a finding hold.
"""
import json
import logging
import statistics
from pathlib import Path

import torch
from scipy.stats import pearsonr, spearmanr

from fqdetr.io import write_json
from fqdetr.data import class_names_of
from fqdetr.engine.checkpoint import seed_everything
from fqdetr.engine.loader import make_loader
from fqdetr.engine.quantize import quantize_detr
from fqdetr.experiments.demo import run_demo
from fqdetr.engine.setup import checkpoint_geometry, critical_setup, evaluate_splits, load_datasets
from fqdetr.evaluation import format_ap
from fqdetr.models import load_detr_checkpoint
from fqdetr.models.checkpoint import read_checkpoint
from fqdetr.quant import set_fake_quant
from fqdetr.sensitivity import fisher_traces

log = logging.getLogger(__name__)


def sensitivity_vs_drop(model, data, loaders, canvas, w_bits=3, fisher_images=32, batch_size=8):
    """Finding 1: per category c, sum_l tr(F_l) of the critical objective of {c} on the float
    model, and AP_c(float) - AP_c(uniform w_bits PTQ) on val (``canvas``: the model's, for the
    Fisher loader). Returns rows and correlations."""
    cats = data["val"].coco.loadCats(data["val"].cat_ids)
    names = [c["name"] for c in cats]
    fisher_loader = make_loader(torch.utils.data.Subset(data["train"], range(fisher_images)), batch_size,
                                canvas, shuffle=False)
    sets = {n: n for n in names}
    float_ap = evaluate_splits(model, {"val": loaders["val"]}, sets)["val"]["critical"]
    ptq = quantize_detr(model, w_bits=w_bits, calib_loader=fisher_loader)
    ptq_ap = evaluate_splits(ptq, {"val": loaders["val"]}, sets)["val"]["critical"]
    rows = []
    float_view = set_fake_quant(quantize_detr(model), False)  # quantizer modules, float numbers
    for name in names:
        _, objectives, _, _ = critical_setup(model, data["val"], name)
        traces = fisher_traces(float_view, fisher_loader, objectives["critical"], progress=False)
        if float_ap[name] is None or ptq_ap[name] is None:
            continue
        rows.append({"category": name, "fisher_trace": sum(traces.values()), "float_AP": float_ap[name],
                     "ptq_AP": ptq_ap[name], "drop": float_ap[name] - ptq_ap[name]})
    x, y = [r["fisher_trace"] for r in rows], [r["drop"] for r in rows]
    # A correlation is undefined when either side is constant (e.g. every AP is 0): None.
    defined = len(rows) > 2 and len(set(x)) > 1 and len(set(y)) > 1
    return {"rows": rows, "w_bits": w_bits,
            "spearman": float(spearmanr(x, y).statistic) if defined else None,
            "pearson": float(pearsonr(x, y).statistic) if defined else None}


def _gap(method, critical):
    tr, va = method["train"]["critical"][critical], method["val"]["critical"][critical]
    return None if tr is None or va is None else tr - va


def _stats(values):
    values = [v for v in values if v is not None and v == v]  # drop undefined (None / NaN)
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(runs, critical):
    """Mean/std over seeds of the quantities each finding is about, and its verdict."""
    def per_seed(fn):
        return _stats([fn(r) for r in runs])

    def crit(method, split="val"):
        return lambda r: r["demo"]["methods"][method][split]["critical"][critical]

    def overall(method):
        return lambda r: r["demo"]["methods"][method]["val"]["mAP"]

    def gap(method):
        return lambda r: _gap(r["demo"]["methods"][method], critical)

    m = ["ptq uniform w4a8", "ptq fisher-overall", "ptq fisher-critical", "qat", "qat + fisher-trace reg",
         "qat + critical up-weighted"]
    s = {"critical_val_AP": {k: per_seed(crit(k)) for k in ["float"] + m},
         "overall_val_mAP": {k: per_seed(overall(k)) for k in ["float"] + m},
         "critical_gap": {k: per_seed(gap(k)) for k in ["float"] + m},
         "spearman_fisher_vs_drop": per_seed(lambda r: r["finding1"]["spearman"]),
         "pearson_fisher_vs_drop": per_seed(lambda r: r["finding1"]["pearson"])}
    mean = lambda table, k: table[k]["mean"]  # noqa: E731
    ca, gp, ov = s["critical_val_AP"], s["critical_gap"], s["overall_val_mAP"]
    s["verdicts"] = {
        "1 sensitivity correlates with Fisher trace": (mean(s, "spearman_fisher_vs_drop") or 0) > 0,
        "2 QAT widens the critical train-val gap": (mean(gp, "qat") or 0) > (mean(gp, "ptq fisher-critical") or 0),
        "3 Fisher-critical allocation beats uniform and Fisher-overall on critical AP":
            (mean(ca, "ptq fisher-critical") or 0) > max(mean(ca, "ptq uniform w4a8") or 0,
                                                          mean(ca, "ptq fisher-overall") or 0),
        "3b ... with overall mAP kept (within 1 AP point of uniform)":
            (mean(ov, "ptq fisher-critical") or 0) >= (mean(ov, "ptq uniform w4a8") or 0) - 0.01,
        "4 Fisher-trace regularisation shrinks the gap": (mean(gp, "qat + fisher-trace reg") or 0) < (mean(gp, "qat")
                                                                                                     or 0),
        "4b ... and raises critical val AP over QAT and over up-weighting":
            (mean(ca, "qat + fisher-trace reg") or 0) > max(mean(ca, "qat") or 0,
                                                             mean(ca, "qat + critical up-weighted") or 0),
    }
    return s


def reproduce(out_dir, model_path, data_dir, seeds=(0, 1, 2), critical="person", qat_steps=40, fisher_images=48,
              eval_images=120, **demo_kwargs):
    """Runs every seed (results cached per seed in OUT/seed<k>/) and writes OUT/summary.json."""
    out_dir = Path(out_dir)
    runs = []
    for seed in seeds:
        seed_dir = out_dir / f"seed{seed}"
        cached = seed_dir / "run.json"
        if cached.exists():
            runs.append(json.loads(cached.read_text()))
            continue
        demo = run_demo(seed_dir, model_path, data_dir, critical=critical, qat_steps=qat_steps,
                        fisher_images=fisher_images, eval_images=eval_images, seed=seed, **demo_kwargs)
        seed_everything(seed)
        model = load_detr_checkpoint(model_path).eval()
        image_size, canvas = checkpoint_geometry(model_path)
        data = load_datasets(data_dir, image_size, max(eval_images, 400), eval_images,
                             class_names=class_names_of(read_checkpoint(model_path)))
        loaders = {"val": make_loader(data["val"], 8, canvas, shuffle=False)}
        offset = torch.utils.data.Subset(data["train"], range(seed * 32, len(data["train"])))
        f1 = sensitivity_vs_drop(model, {"train": offset, "val": data["val"]}, loaders, canvas)
        run = {"seed": seed, "demo": demo, "finding1": f1}
        write_json(run, cached, indent=None)
        runs.append(run)
    summary = summarize(runs, critical)
    write_json(summary, out_dir / "summary.json")
    return summary


def _fmt(stat, scale=100.0):
    if stat["mean"] is None:
        return "n/a"
    return f"{format_ap(stat['mean'], scale)} ± {format_ap(stat['std'], scale)}"


def render_findings(summary, critical, seeds):
    """Markdown: the per-method table (mean ± std over seeds) and each finding's verdict."""
    lines = [f"Critical set: **{critical}**; seeds {list(seeds)}; AP in percent, mean ± std over seeds.", "",
             "| method | val mAP | critical val AP | critical train-val gap |", "|---|---|---|---|"]
    for k in summary["critical_val_AP"]:
        lines.append(f"| {k} | {_fmt(summary['overall_val_mAP'][k])} | {_fmt(summary['critical_val_AP'][k])} | "
                     f"{_fmt(summary['critical_gap'][k])} |")
    lines += ["", f"Finding 1: Spearman correlation between a category's critical Fisher trace and its AP drop "
                  f"under uniform 3-bit PTQ: {_fmt(summary['spearman_fisher_vs_drop'], 1.0)} (Pearson "
                  f"{_fmt(summary['pearson_fisher_vs_drop'], 1.0)}).", "", "| finding | holds here? |", "|---|---|"]
    lines += [f"| {name} | {'yes' if ok else 'no'} |" for name, ok in summary["verdicts"].items()]
    return "\n".join(lines) + "\n"
