"""Finding 5 (docs/METHOD.md section 6): the Fisher-critical allocation's gain over uniform PTQ
grows with model size and number of classes. From several models' study summaries (each run on
its own dataset, e.g. the built-in generator at two category counts): each model's gain, and
between consecutive models (ordered by parameters, then classes) the difference of gains over
the seeds both ran, with its t interval widened by both models' val-image noise: each gain's
bootstrap standard deviation (of its mean over all its n seeds), scaled by sqrt(n / m) for the m
shared seeds (a bound: the seeds share their val images, so their noise is mostly common), the
two added in quadrature (conservative for two models on the same val images, whose noise is
positively correlated). A step holds when its interval, over at least 2 shared seeds and with
both noises known, lies above 0; finding 5 holds when every step does."""
import math

from fqdetr.stats import seed_interval


def _gain(summary, cfg):
    """The per-seed {seed: gain} of Fisher-critical (first mode) over uniform on critical AP."""
    a = f"ptq fisher-critical-{cfg.modes[0]}"
    c = next(c for c in summary["comparisons"] if c["a"] == a and c["b"] == "ptq uniform"
             and c["metric"] == "critical AP")
    return {r["seed"]: r["diff"] for r in c["per_seed"]}, c["across_seeds"]


def _step(small, big, gs, gb):
    """Finding 5's step from model ``small`` to ``big`` (entries of finding5's "models"), given
    their per-seed gains ``gs`` / ``gb`` ({seed: gain})."""
    common = [k for k in gs if k in gb and gs[k] is not None and gb[k] is not None]
    stds = [m["gain"].get("std_images") for m in (small, big)]
    image_std = None
    if common and None not in stds:  # each model's noise of a mean over the m shared seeds, bounded
        image_std = math.hypot(*(std * math.sqrt(m["gain"]["n"] / len(common)) for std, m in zip(stds, (small, big))))
    difference = seed_interval([gb[k] - gs[k] for k in common], image_std=image_std)
    return {"smaller": small["name"], "larger": big["name"], "difference": difference,
            "holds": difference["n"] >= 2 and image_std is not None and difference["low"] > 0}


def finding5(summaries, cfg):
    """{"models": [{"name", "num_params", "num_classes", "detector", "gain"}] (ascending),
    "steps": [{"smaller", "larger", "difference", "holds"}], "holds"}."""
    ordered = sorted(summaries.items(), key=lambda kv: (kv[1]["num_params"], kv[1]["num_classes"]))
    models, per_seed = [], []
    for name, s in ordered:
        seeds, across = _gain(s, cfg)
        models.append({"name": name, "num_params": s["num_params"], "num_classes": s["num_classes"],
                       "detector": s["detector"], "gain": across})
        per_seed.append(seeds)
    steps = [_step(small, big, gs, gb)
             for (small, big), (gs, gb) in zip(zip(models, models[1:]), zip(per_seed, per_seed[1:]))]
    return {"models": models, "steps": steps, "holds": bool(steps) and all(st["holds"] for st in steps)}
