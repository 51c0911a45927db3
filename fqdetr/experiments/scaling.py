"""Finding 5 (docs/METHOD.md section 6): the Fisher-critical allocation's gain over uniform PTQ
grows with model size and number of classes. From several models' study summaries (each run on
its own dataset, e.g. the built-in generator at two category counts): each model's gain, and
between consecutive models (ordered by parameters, then classes) the difference of gains over
the seeds both ran, with its t interval widened by both models' val-image noise (each gain's
bootstrap standard deviation, added in quadrature: exact for models on different val sets,
conservative for two on the same images, whose noise is positively correlated); it holds when
every such interval lies above 0."""
import math

from fqdetr.stats import seed_interval


def _gain(summary, cfg):
    """The per-seed {seed: gain} of Fisher-critical (first mode) over uniform on critical AP."""
    a = f"ptq fisher-critical-{cfg.modes[0]}"
    c = next(c for c in summary["comparisons"] if c["a"] == a and c["b"] == "ptq uniform"
             and c["metric"] == "critical AP")
    return {r["seed"]: r["diff"] for r in c["per_seed"]}, c["across_seeds"]


def finding5(summaries, cfg):
    """{"models": [{"name", "num_params", "num_classes", "gain"}] (ascending), "steps": [{"smaller",
    "larger", "difference"}], "holds"}."""
    ordered = sorted(summaries.items(), key=lambda kv: (kv[1]["num_params"], kv[1]["num_classes"]))
    models, per_seed = [], []
    for name, s in ordered:
        seeds, across = _gain(s, cfg)
        models.append({"name": name, "num_params": s["num_params"], "num_classes": s["num_classes"],
                       "detector": s["detector"], "gain": across})
        per_seed.append(seeds)
    steps = []
    for (small, big), (gs, gb) in zip(zip(models, models[1:]), zip(per_seed, per_seed[1:])):
        common = [k for k in gs if k in gb and gs[k] is not None and gb[k] is not None]
        stds = [m["gain"].get("std_images") for m in (small, big)]
        image_std = math.hypot(*stds) if None not in stds else None
        steps.append({"smaller": small["name"], "larger": big["name"],
                      "difference": seed_interval([gb[k] - gs[k] for k in common], image_std=image_std)})
    holds = bool(steps) and all(st["difference"]["low"] is not None and st["difference"]["low"] > 0 for st in steps)
    return {"models": models, "steps": steps, "holds": holds}
