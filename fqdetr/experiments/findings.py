"""The findings study (docs/METHOD.md section 6): every seed's arms (fqdetr.experiments.study),
each reported difference with its paired bootstrap interval over val images and, across seeds,
a Student-t interval of the per-seed differences widened by the val images' bootstrap variance
(fqdetr.stats.seed_interval); a finding holds only when its interval excludes zero in the
claimed direction (the across-seed interval with two or more seeds, the bootstrap interval with
one). Finding 1 holds when the pooled permutation p-value of the mean rho is below 0.05.

Per-seed results are cached in OUT/seed<k>/run.json (an interrupted study resumes; a cache
written under other settings is an error, not silently mixed in).
"""
import json
import logging
import time
from pathlib import Path

import numpy as np

from fqdetr.experiments.findings_report import render_finding5, render_findings
from fqdetr.experiments.scaling import finding5
from fqdetr.experiments.study import StudyConfig, run_seed
from fqdetr.io import atomic_write_text, file_sha256, write_json
from fqdetr.stats import paired_interval, pooled_permutation_pvalue, seed_interval

log = logging.getLogger(__name__)

RANDOM = "ptq random (mean of draws)"


def _metric(record, metric, critical):
    """(point, bootstrap samples [B] or None) of ``metric`` ("mAP", "critical AP", "gap") in an
    arm's record {"val", ["train"]}."""
    val = record["val"]
    boot = val.get("bootstrap")
    if metric == "mAP":
        return val["mAP"], boot and _floats(boot["mAP"])
    if metric == "critical AP":
        return val["critical"][critical], boot and _floats(boot[critical])
    if metric == "critical AP transformed":
        return val["critical_transformed"][critical], None
    if metric != "gap":
        raise ValueError(f"metric: expected mAP, critical AP, critical AP transformed or gap, got {metric!r}")
    train, tboot = record["train"], record["train"].get("bootstrap")
    point = None if None in (train["critical"][critical], val["critical"][critical]) else \
        train["critical"][critical] - val["critical"][critical]
    return point, boot and tboot and _floats(tboot[critical]) - _floats(boot[critical])


def _floats(values):
    """Resampled APs as a float array, undefined (None) ones NaN."""
    return np.array(values, dtype=float)


def _with_random_mean(arms):
    """``arms`` plus RANDOM: the mean of the random draws' APs (points and resamples)."""
    draws = [r for name, r in arms.items() if name.startswith("ptq random-")]
    if not draws:
        return arms
    val = {"mAP": float(np.mean([d["val"]["mAP"] for d in draws]))}
    for key in ("critical", "critical_transformed"):
        val[key] = {k: _mean([d["val"][key][k] for d in draws]) for k in draws[0]["val"].get(key, {})}
    if "bootstrap" in draws[0]["val"]:
        val["bootstrap"] = {k: _nanmean([_floats(d["val"]["bootstrap"][k]) for d in draws])
                            for k in draws[0]["val"]["bootstrap"]}
    return {**arms, RANDOM: {"val": val}}


def _nanmean(arrays):
    """Elementwise mean of equal-length arrays over their defined (finite) entries, NaN where none is."""
    a = np.stack(arrays)
    n = np.isfinite(a).sum(0)
    return np.divide(np.nansum(a, 0), n, out=np.full(a.shape[1], np.nan), where=n > 0).tolist()


def _mean(values):
    return None if any(v is None for v in values) else float(np.mean(values))


def comparisons(cfg):
    """[(finding, claim, metric, arm a, arm b, direction, margin)]: the claim is a - b > margin
    (direction +1) or a - b < -margin (direction -1)."""
    out = []
    start = f"ptq fisher-critical-{cfg.modes[0]}"
    for m in cfg.modes:
        a = f"ptq fisher-critical-{m}"
        for b in ("ptq uniform", "ptq fisher-overall", RANDOM, "ptq hessian"):
            out.append(("3", f"Fisher-critical ({m}) beats {b.replace('ptq ', '')} on critical AP",
                        "critical AP", a, b, 1, 0.0))
        out.append(("3", f"... on critical AP of the transformed predictions, over uniform ({m})",
                    "critical AP transformed", a, "ptq uniform", 1, 0.0))
        out.append(("3b", f"Fisher-critical ({m}) keeps overall mAP (no more than 1 point below uniform)",
                    "mAP", a, "ptq uniform", 1, -0.01))
    out += [("context", "random mixed precision beats uniform on critical AP", "critical AP", RANDOM,
             "ptq uniform", 1, 0.0),
            ("2", "QAT widens the critical train-val gap", "gap", "qat", start, 1, 0.0),
            ("4", "the Fisher-trace regulariser shrinks the gap", "gap", "qat + fisher-trace reg", "qat", -1, 0.0),
            ("4b", "the regulariser raises critical val AP over QAT", "critical AP", "qat + fisher-trace reg",
             "qat", 1, 0.0),
            ("4b", "... and over up-weighting", "critical AP", "qat + fisher-trace reg",
             "qat + critical up-weighted", 1, 0.0)]
    return out


def _holds(interval, direction, margin):
    if interval["low"] is None:
        return False
    return interval["low"] > margin if direction > 0 else interval["high"] < -margin


def compare(runs, critical, comparison):
    """One comparison over the runs: per seed the point difference and its paired bootstrap
    interval, across seeds the t interval, and the verdict."""
    finding, claim, metric, a, b, direction, margin = comparison
    per_seed, resampled = [], []
    for run in runs:
        arms = _with_random_mean(run["arms"])
        (pa, sa), (pb, sb) = _metric(arms[a], metric, critical), _metric(arms[b], metric, critical)
        if sa is not None and sb is not None:
            r = paired_interval(sa, sb, pa, pb)
            resampled.append(sa - sb)
        else:
            diff = None if pa is None or pb is None else pa - pb
            r = {"diff": diff, "low": None, "high": None, "holds": False}
        per_seed.append({"seed": run["seed"], **r})
    # every seed resampled the same val images (study.BOOTSTRAP_SEED): the seed mean per resample
    images = _nanmean(resampled) if len(resampled) == len(runs) and len(runs) > 1 else None
    across = seed_interval([r["diff"] for r in per_seed], image_samples=images)
    decisive = across if len(runs) > 1 else per_seed[0]
    return {"finding": finding, "claim": claim, "metric": metric, "a": a, "b": b, "direction": direction,
            "margin": margin, "per_seed": per_seed, "across_seeds": across,
            "holds": _holds(decisive, direction, margin)}


def arm_table(runs, critical):
    """{arm: {metric: seed_interval of the per-seed values}}."""
    arms = _with_random_mean(runs[0]["arms"])
    table = {}
    for name in arms:
        row = {}
        for metric in ("mAP", "critical AP", "critical AP transformed", "gap"):
            if metric == "gap" and "train" not in arms[name]:
                continue
            row[metric] = seed_interval([_metric(_with_random_mean(r["arms"])[name], metric, critical)[0]
                                         for r in runs])
        table[name] = row
    return table


def finding1_summary(runs, permutations=10000):
    """Per grouping (category, supercategory): rho across seeds (t interval), the per-seed
    permutation p-values and the pooled one of the mean rho (fqdetr.stats.pooled_permutation_pvalue;
    with one seed, that seed's test); holds when the mean rho > 0 with pooled p < 0.05. (With 4
    supercategories every seed's rho is a multiple of 0.2: equal rhos give a zero-width t
    interval, so the interval alone decides nothing.)"""
    out = {}
    for key in ("per_category", "per_supercategory"):
        rhos = [r["finding1"][key]["spearman"] for r in runs]
        ps = [r["finding1"][key]["p_value"] for r in runs]
        pairs = [([row["fisher_trace"] for row in r["finding1"][key]["rows"]],
                  [row["drop"] for row in r["finding1"][key]["rows"]]) for r in runs]
        mean_rho, pooled = (rhos[0], ps[0]) if len(runs) == 1 else pooled_permutation_pvalue(pairs, permutations)
        holds = bool(pooled is not None and pooled < 0.05 and mean_rho > 0)
        out[key] = {"spearman": seed_interval(rhos), "per_seed_spearman": rhos, "per_seed_p": ps,
                    "pooled_p": pooled, "n_groups": runs[0]["finding1"][key]["n"], "holds": holds}
    return out


def summarize(runs, cfg):
    """The study's summary: arm table, comparisons, finding 1, provenance."""
    first = runs[0]
    return {"config": cfg.as_dict(), "seeds": [r["seed"] for r in runs], "model": first["model"],
            "num_params": first["num_params"], "num_classes": first["num_classes"],
            "detector": first["detector"], "traces_from": first["traces_from"], "qat_start": first["qat_start"],
            "val_images": first["val_images"], "fisher_images": first["fisher_images"],
            "avg_bits_all_layers": first["avg_bits_all_layers"], "finding1_mode": first["finding1"]["mode"],
            "finding1_bits": first["finding1"]["w_bits"], "finding1_images": first["finding1"]["images"],
            "seed_seconds": [r["seconds"] for r in runs], "seed_stages": [r["stages"] for r in runs],
            "arms": arm_table(runs, cfg.critical),
            "comparisons": [compare(runs, cfg.critical, c) for c in comparisons(cfg)],
            "finding1": finding1_summary(runs)}


def _cached(path, cfg, model_path):
    """The cached run at ``path``, or None; ValueError when it was made with other settings or
    another checkpoint (by content: a retrained model at the same path is another model)."""
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    if run["config"] != cfg.as_dict() or run["model"] != str(model_path):
        raise ValueError(f"--out: {path} was written by a study with other settings or another model; "
                         f"use a fresh --out folder (or delete that file)")
    if run.get("model_sha256") != file_sha256(model_path):
        raise ValueError(f"--out: {path} was written for another version of {model_path} (its SHA-256 "
                         f"differs or was not recorded); use a fresh --out folder (or delete that file)")
    return run


def reproduce(out_dir, model_path, data_dir, seeds=(0, 1, 2, 3, 4), cfg=None):
    """Runs (or loads from OUT/seed<k>/run.json) every seed, writes OUT/summary.json and returns
    the summary; ``wall_seconds`` is this call's wall time (cached seeds cost ~0)."""
    start, out_dir, cfg = time.time(), Path(out_dir), cfg or StudyConfig()
    runs = []
    for seed in seeds:
        cache = out_dir / f"seed{seed}" / "run.json"
        run = _cached(cache, cfg, model_path)
        if run is None:
            log.info("seed %d: running every arm", seed)
            run = run_seed(model_path, data_dir, cfg, seed)
            write_json(run, cache, indent=None)
        runs.append(run)
    summary = summarize(runs, cfg)
    summary["wall_seconds"] = time.time() - start
    write_json(summary, out_dir / "summary.json")
    return summary


def reproduce_models(out_dir, models, datasets, seeds, cfg):
    """``reproduce`` for each checkpoint of ``models`` on its dataset of ``datasets``, each in
    OUT/<file name> (one model: OUT itself), with its OUT/.../findings.md; with several, finding 5
    in OUT/finding5.json and OUT/findings.md. Returns the markdown."""
    out_dir, names = Path(out_dir), [Path(m).stem for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"--model: two checkpoints share a file name ({names}); their folders would clash")
    folders = [out_dir] if len(models) == 1 else [out_dir / n for n in names]
    summaries, sections = {}, []
    for name, folder, model, data in zip(names, folders, models, datasets):
        summaries[name] = reproduce(folder, model, data, seeds, cfg)
        text = render_findings(summaries[name])
        atomic_write_text(folder / "findings.md", text)
        sections.append(f"## `{name}`\n\n{text}")
    if len(models) == 1:
        return text
    growth = finding5(summaries, cfg)
    write_json(growth, out_dir / "finding5.json")
    text = "\n".join(sections) + "\n" + render_finding5(growth)
    atomic_write_text(out_dir / "findings.md", text)
    return text
