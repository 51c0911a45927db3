"""The findings study's markdown (OUT/findings.md): each arm's APs and each reported
difference with its intervals and verdict, finding 1 with its permutation p-values, the wall
time. Reads only the summary fqdetr.experiments.findings.summarize writes."""
from fqdetr.evaluation.report import format_ap

METRICS = ("mAP", "critical AP", "critical AP transformed", "gap")


def _interval(stat, scale=100.0):
    """"mean [low, high]" of a seed_interval / paired_interval ({"diff", "low", "high"})."""
    if stat is None or stat.get("diff") is None:
        return "n/a"
    if stat.get("low") is None:
        return format_ap(stat["diff"], scale)
    return f"{format_ap(stat['diff'], scale)} [{format_ap(stat['low'], scale)}, {format_ap(stat['high'], scale)}]"


def _header(s):
    cfg, minutes = s["config"], s["wall_seconds"] / 60
    per_seed = ", ".join(f"{t / 60:.1f}" for t in s["seed_seconds"])
    return [f"Model `{s['model']}` ({s['detector']}); critical set **{cfg['critical']}**; seeds {s['seeds']}; "
            f"{s['val_images']} val images (the same for every seed, bootstrap over them with {cfg['bootstrap']} "
            f"resamples); {s['fisher_images']} Fisher / calibration images drawn per seed from the training split; "
            f"weights at {s['avg_bits_all_layers']:.2f} bits on average in every PTQ arm (the size of uniform "
            f"W{cfg['budget_bits']}A8); {cfg['qat_steps']} QAT steps from `{s['qat_start']}`.",
            "", f"Traces (Fisher and Hessian) from the {s['traces_from']}.",
            "", f"Wall time: {minutes:.1f} min for this call (per seed, when run: {per_seed} min).", ""]


def _arm_table(s):
    lines = ["AP in percent: mean over seeds [95% t interval over seeds].", "",
             "| arm | val mAP | critical val AP | critical AP (transformed) | critical train-val gap |",
             "|---|---|---|---|---|"]
    for name, row in s["arms"].items():
        lines.append(f"| {name} | " + " | ".join(_interval(row.get(m)) for m in METRICS) + " |")
    return lines


def _comparison_table(s):
    lines = ["", "Differences a - b in AP points: mean over seeds [95% interval: t over seeds, widened by the "
                 "val images' bootstrap variance of the seed mean]; per seed, the "
                 "difference [paired bootstrap 95% interval over val images]. A claim holds only when its "
                 "interval (over seeds; with one seed, the bootstrap one) excludes zero in the claimed direction "
                 "(3b: stays above -1 point).", "",
             "| finding | claim | a - b over seeds | per seed | holds |", "|---|---|---|---|---|"]
    for c in s["comparisons"]:
        per_seed = "; ".join(f"{r['seed']}: {_interval(r)}" for r in c["per_seed"])
        lines.append(f"| {c['finding']} | {c['claim']} (`{c['a']}` - `{c['b']}`) | {_interval(c['across_seeds'])} "
                     f"| {per_seed} | {'yes' if c['holds'] else 'no'} |")
    return lines


def _finding1(s):
    lines = ["", f"Finding 1: Spearman's rho between a group's critical Fisher trace (T_S mode "
                 f"`{s['finding1_mode']}`, over {s['finding1_images']} of the seed's Fisher images) and its val AP drop "
                 f"under uniform {s['finding1_bits']}-bit PTQ; "
                 "p: two-sided permutation p-value per seed (with n groups it cannot go below 2/n!) and pooled over "
                 "seeds (the mean rho, every seed's pairing permuted); holds when the mean rho > 0 with pooled p < "
                 "0.05.", "",
             "| grouping | groups | rho over seeds | rho per seed | p per seed | pooled p | holds |",
             "|---|---|---|---|---|---|---|"]
    for key, f in s["finding1"].items():
        rhos = ", ".join("n/a" if r is None else f"{r:.2f}" for r in f["per_seed_spearman"])
        ps = ", ".join(_p(p) for p in f["per_seed_p"])
        lines.append(f"| {key.replace('per_', '')} | {f['n_groups']} | {_interval(f['spearman'], 1.0)} | {rhos} | "
                     f"{ps} | {_p(f.get('pooled_p'))} | {'yes' if f['holds'] else 'no'} |")
    return lines


def _p(value):
    return "n/a" if value is None else f"{value:.3g}"


def _stages(s):
    """Each stage's wall / CPU minutes in the first seed (eval stages also run inside others)."""
    stages = s["seed_stages"][0]
    return ["", f"Time per stage, seed {s['seeds'][0]} (minutes wall / CPU of all threads; the eval stages also "
                "run inside the QAT and finding-1 stages):", "", "| stage | runs | wall | CPU |", "|---|---|---|---|"] + \
        [f"| {name} | {t['runs']} | {t['wall'] / 60:.1f} | {t['cpu'] / 60:.1f} |" for name, t in stages.items()]


def render_findings(summary):
    """Markdown of a study summary."""
    return "\n".join(_header(summary) + _arm_table(summary) + _comparison_table(summary)
                     + _finding1(summary) + _stages(summary)) + "\n"


def render_finding5(growth):
    """Markdown of fqdetr.experiments.scaling.finding5's result."""
    lines = ["## Finding 5: the gain grows with model size and number of classes", "",
             "Gain: Fisher-critical minus uniform PTQ critical AP, mean over seeds [95% t interval].", "",
             "| model | detector | parameters | classes | gain |", "|---|---|---|---|---|"]
    lines += [f"| `{m['name']}` | {m['detector']} | {m['num_params']:,} | {m['num_classes']} | {_interval(m['gain'])} |"
              for m in growth["models"]]
    lines += ["", "Step: the larger model's gain minus the smaller's over the seeds both ran [95% t interval, "
              "widened by both models' val-image noise]; it holds when that lies above 0 (2 or more seeds).", "",
              "| smaller | larger | gain difference over seeds | seeds | holds |", "|---|---|---|---|---|"]
    lines += [f"| `{st['smaller']}` | `{st['larger']}` | {_interval(st['difference'])} | {st['difference']['n']} "
              f"| {'yes' if st['holds'] else 'no'} |" for st in growth["steps"]]
    lines += ["", f"Finding 5 holds: {'yes' if growth['holds'] else 'no'} (it needs every step to hold)."]
    return "\n".join(lines) + "\n"
