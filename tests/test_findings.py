"""Aggregation of the findings over seeds: statistics and verdicts from given numbers."""
from fqdetr.experiments.findings import render_findings, summarize

METHODS = ["float", "ptq uniform w4a8", "ptq fisher-overall", "ptq fisher-critical", "qat",
           "qat + fisher-trace reg", "qat + critical up-weighted"]


def _run(seed, crit_val, crit_train, overall, spearman):
    methods = {m: {"val": {"mAP": overall[m], "critical": {"person": crit_val[m]}},
                   "train": {"mAP": overall[m], "critical": {"person": crit_train[m]}}} for m in METHODS}
    return {"seed": seed, "demo": {"methods": methods}, "finding1": {"spearman": spearman, "pearson": spearman}}


def test_verdicts_follow_the_numbers():
    val = dict(zip(METHODS, [0.5, 0.30, 0.32, 0.36, 0.40, 0.42, 0.41]))
    train = dict(zip(METHODS, [0.55, 0.33, 0.35, 0.39, 0.50, 0.47, 0.52]))
    overall = dict(zip(METHODS, [0.5, 0.40, 0.41, 0.405, 0.45, 0.45, 0.44]))
    runs = [_run(s, val, train, overall, 0.6 + 0.1 * s) for s in range(3)]
    runs[2]["finding1"]["spearman"] = None  # undefined correlations are left out, not counted as 0
    s = summarize(runs, "person")
    assert s["spearman_fisher_vs_drop"]["n"] == 2 and abs(s["spearman_fisher_vs_drop"]["mean"] - 0.65) < 1e-12
    assert abs(s["critical_gap"]["qat"]["mean"] - 0.1) < 1e-9
    assert all(s["verdicts"].values())
    val["qat + fisher-trace reg"] = 0.39  # now below plain QAT: finding 4b must fail
    assert not summarize([_run(0, val, train, overall, 0.5)], "person")["verdicts"][
        "4b ... and raises critical val AP over QAT and over up-weighting"]
    text = render_findings(s, "person", [0, 1, 2])
    assert "| qat | 45.0 ± 0.0 | 40.0 ± 0.0 | 10.0 ± 0.0 |" in text and "| yes |" in text
