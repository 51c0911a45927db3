"""The findings study: verdicts from intervals (given numbers), and a tiny end-to-end ``fqdetr reproduce``."""
import json
from pathlib import Path

import numpy as np
import pytest

from fqdetr.experiments.findings import RANDOM, summarize
from fqdetr.experiments.findings_report import render_findings
from fqdetr.experiments.study import StudyConfig

CFG = StudyConfig(modes=("lse",), bootstrap=50)
PTQ = ["ptq uniform", "ptq random-0", "ptq random-1", "ptq hessian", "ptq fisher-overall", "ptq fisher-critical-lse"]
QAT = ["qat", "qat + fisher-trace reg", "qat + critical up-weighted"]


def _split(ap, rng, spread):
    samples = (ap + rng.normal(0, spread, CFG.bootstrap)).tolist()
    return {"mAP": ap, "critical": {"person": ap}, "critical_transformed": {"person": ap},
            "bootstrap": {"mAP": samples, "person": samples}}


def _run(seed, val, train, spread=0.005):
    """A run whose arms have critical AP = mAP = val[arm], bootstrap samples around it."""
    rng = np.random.default_rng(seed)
    arms = {a: {"val": _split(v, rng, spread)} for a, v in val.items()}
    for a, v in train.items():
        arms[a]["train"] = _split(v, rng, spread)
    drops = np.arange(16.0)
    drops[[seed, seed + 1]] = drops[[seed + 1, seed]]  # rho just below 1, a little different per seed
    categories = [{"fisher_trace": float(k), "drop": float(d)} for k, d in enumerate(drops)]
    f1 = {"mode": "matched", "w_bits": 3, "images": 200,
          "per_category": {"spearman": 0.5 + 0.1 * seed, "p_value": 0.01, "n": 16, "rows": categories},
          "per_supercategory": {"spearman": None, "p_value": None, "n": 4, "rows": [{"fisher_trace": 1.0, "drop": 0.1}]}}
    return {"seed": seed, "arms": arms, "finding1": f1, "model": "m.pth", "detector": "DETR", "num_params": 1,
            "num_classes": 16, "traces_from": "the uniform PTQ model", "qat_start": "ptq fisher-critical-lse",
            "val_images": 500, "fisher_images": 200, "avg_bits_all_layers": 4.05, "seconds": 60.0,
            "stages": {"fisher": {"wall": 50.0, "cpu": 90.0, "runs": 4}}}


def _values(shift=0.0):
    val = dict(zip(["float"] + PTQ + QAT, [0.5, 0.30, 0.31, 0.33, 0.32, 0.34, 0.40, 0.42, 0.45, 0.41]))
    train = {"float": 0.55, "ptq fisher-critical-lse": 0.41, "qat": 0.48, "qat + fisher-trace reg": 0.46,
             "qat + critical up-weighted": 0.47}
    return {k: v + shift for k, v in val.items()}, train


def _verdicts(summary):
    return {(c["claim"], c["b"]): c["holds"] for c in summary["comparisons"]}


def test_verdicts_follow_the_intervals():
    runs = [_run(s, *_values(0.002 * s)) for s in range(3)]
    s = summarize(runs, CFG)
    s["wall_seconds"] = 1.0
    v = _verdicts(s)
    assert v[("Fisher-critical (lse) beats uniform on critical AP", "ptq uniform")]
    assert v[("Fisher-critical (lse) beats random (mean of draws) on critical AP", RANDOM)]
    assert v[("QAT widens the critical train-val gap", "ptq fisher-critical-lse")]  # gap 0.07 - 0.01
    assert v[("the Fisher-trace regulariser shrinks the gap", "qat")]  # 0.01 vs 0.07
    assert v[("the regulariser raises critical val AP over QAT", "qat")]
    c = next(c for c in s["comparisons"] if c["b"] == RANDOM)
    assert c["across_seeds"]["diff"] == pytest.approx(0.40 - 0.32)  # the random draws' mean is 0.32
    assert s["finding1"]["per_category"]["holds"] and not s["finding1"]["per_supercategory"]["holds"]
    for c in s["comparisons"]:  # every interval contains its point
        for r in c["per_seed"]:
            assert r["low"] is None or r["low"] - 1e-12 <= r["diff"] <= r["high"] + 1e-12
    text = render_findings(s)
    assert "| ptq fisher-critical-lse | 40.2 [" in text and "| yes |" in text
    assert "Wall time: 0.0 min for this call (per seed, when run: 1.0, 1.0, 1.0 min)" in text


def test_equal_small_rhos_over_seeds_do_not_make_finding1_hold():
    """4 supercategories with rho 0.2 in every seed: the t interval has zero width above 0, but
    the pooled permutation test (p ~ 0.7) says such rhos are what random pairings give."""
    runs = [_run(s, *_values()) for s in range(3)]
    for r in runs:
        r["finding1"]["per_supercategory"] = {"spearman": 0.2, "p_value": 0.92, "n": 4, "rows": [
            {"fisher_trace": float(t), "drop": float(d)} for t, d in zip([1, 2, 3, 4], [1, 4, 3, 2])]}
    f = summarize(runs, CFG)["finding1"]["per_supercategory"]
    assert f["spearman"]["low"] == pytest.approx(0.2) and f["pooled_p"] > 0.3 and not f["holds"]
    assert summarize(runs, CFG)["finding1"]["per_category"]["pooled_p"] < 0.001


def test_a_difference_inside_the_noise_does_not_hold():
    val, train = _values()
    val["ptq fisher-critical-lse"] = 0.305  # 0.5 points over uniform, bootstrap spread 5 points
    s = summarize([_run(0, val, train, spread=0.05)], CFG)  # one seed: the bootstrap interval decides
    c = next(c for c in s["comparisons"] if c["b"] == "ptq uniform" and c["metric"] == "critical AP")
    assert c["per_seed"][0]["low"] < 0 < c["per_seed"][0]["high"] and not c["holds"]
    val["ptq fisher-critical-lse"] = 0.29  # 1 point below uniform on mAP: 3b fails
    assert not _verdicts(summarize([_run(0, val, train, spread=0.0)], CFG))[
        ("Fisher-critical (lse) keeps overall mAP (no more than 1 point below uniform)", "ptq uniform")]


def test_study_config_rejects_unknown_modes():
    with pytest.raises(ValueError, match="modes"):
        StudyConfig(modes=("lse", "nope"))


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """``fqdetr reproduce`` of a one-layer DETR on 3 val images, 4 Fisher images, 1 seed, 2 QAT steps."""
    import torch

    from fqdetr.cli import main as cli_main
    from fqdetr.data import make_builtin_dataset
    from fqdetr.models import build_detr
    from fqdetr.models.checkpoint import save_detr_checkpoint

    root = tmp_path_factory.mktemp("reproduce")
    torch.manual_seed(0)  # a module fixture runs before the autouse per-test seed
    save_detr_checkpoint(build_detr("tiny", num_classes=16, enc_layers=1, dec_layers=1), root / "model.pth")
    make_builtin_dataset(root / "data", num_train=16, num_val=4, seed=0)
    args = ["reproduce", "--out", str(root / "out"), "--model", str(root / "model.pth"), "--data", str(root / "data"),
            "--seeds", "0", "--eval-images", "3", "--fisher-images", "4", "--qat-steps", "2", "--bootstrap", "20",
            "--random-draws", "2", "--hutchinson-probes", "1", "--finding1-images", "2", "--batch-size", "2",
            "--modes", "lse,matched"]
    assert cli_main(args) == 0
    return root / "out", args


@pytest.mark.slow
def test_tiny_reproduce_writes_every_output(tiny_study):
    out, _ = tiny_study
    summary, run = (json.loads(p.read_text()) for p in (out / "summary.json", out / "seed0" / "run.json"))
    assert set(run["arms"]) == {"float", "ptq uniform", "ptq random-0", "ptq random-1", "ptq hessian",
                                "ptq fisher-overall", "ptq fisher-critical-lse", "ptq fisher-critical-matched",
                                "qat", "qat + fisher-trace reg", "qat + critical up-weighted"}
    assert run["val_images"] == 3 and run["fisher_images"] == 4 and "uniform" in run["traces_from"]
    assert len(run["arms"]["qat"]["val"]["bootstrap"]["person"]) == 20
    assert "person" in run["arms"]["float"]["val"]["critical_transformed"]
    assert len(run["allocations"]) == 7  # uniform, 2 random, hessian, overall, 2 critical
    size = {a: sum(run["sizes"][n] * b for n, b in alloc.items()) for a, alloc in run["allocations"].items()}
    assert all(s <= size["uniform"] for s in size.values())  # every arm at the same size budget
    assert summary["wall_seconds"] > 0 and summary["seeds"] == [0]
    for c in summary["comparisons"]:
        for r in c["per_seed"]:
            if r["low"] is not None:  # an interval contains its point estimate
                assert r["low"] - 1e-12 <= r["diff"] <= r["high"] + 1e-12
    assert set(summary["finding1"]) == {"per_category", "per_supercategory"}
    text = (out / "findings.md").read_text()
    assert "Wall time:" in text and "| finding | claim |" in text and "supercategory" in text
    assert run["finding1"]["images"] == 2 and run["stages"]["fisher"]["runs"] == 1  # 3 traces in one stage
    assert "| hutchinson | 1 |" in text


@pytest.mark.slow
def test_tiny_reproduce_resumes_from_its_cache(tiny_study, capsys):
    from fqdetr.cli import main as cli_main

    out, args = tiny_study
    before = (out / "seed0" / "run.json").read_text()
    assert cli_main(args) == 0  # cached: no arm is run again
    assert (out / "seed0" / "run.json").read_text() == before
    assert cli_main(args[:-1] + ["lse"]) == 2  # other settings: refused, not mixed in
    assert "other settings" in capsys.readouterr().err
    model = Path(args[args.index("--model") + 1])
    original = model.read_bytes()
    try:  # a retrained checkpoint at the same path: refused, not mixed in
        model.write_bytes(original + b"\0")
        assert cli_main(args) == 2
        assert "another version" in capsys.readouterr().err
    finally:
        model.write_bytes(original)


def _summary(num_params, num_classes, gains, std_images):
    """A study summary holding only what finding 5 reads: the Fisher-critical minus uniform
    critical-AP comparison, per seed and across seeds."""
    from fqdetr.stats import seed_interval
    per_seed = [{"seed": k, "diff": g} for k, g in gains.items()]
    return {"num_params": num_params, "num_classes": num_classes, "detector": "DETR",
            "comparisons": [{"a": "ptq fisher-critical-lse", "b": "ptq uniform", "metric": "critical AP",
                             "per_seed": per_seed,
                             "across_seeds": seed_interval(list(gains.values()), image_std=std_images)}]}


def test_finding5_orders_models_and_widens_each_step_by_both_val_noises():
    from scipy.stats import t as student_t

    from fqdetr.experiments.scaling import finding5
    summaries = {"wide32": _summary(300, 32, {0: 4.0, 1: 5.0, 2: 6.0}, 0.4),
                 "small": _summary(100, 16, {0: 1.0, 1: 1.5, 2: 2.5, 3: 9.0}, 0.6),
                 "wide16": _summary(300, 16, {0: 2.0, 1: 3.0, 2: 3.5}, 0.0)}
    growth = finding5(summaries, CFG)
    assert [m["name"] for m in growth["models"]] == ["small", "wide16", "wide32"]  # parameters, then classes
    first, second = growth["steps"]
    # small -> wide16 over the seeds both ran (0-2): differences 1.0, 1.5, 1.0; mean 7/6, std
    # sqrt(1/12). Image noise: small's std of its 4-seed mean, 0.6, bounded for 3 seeds by
    # 0.6 * sqrt(4/3), in quadrature with wide16's 0; Welch-Satterthwaite df = 2 * (var / (std^2 / 3))^2
    seeds_var = (1 / 12) / 3
    var = seeds_var + 0.6 ** 2 * 4 / 3
    half = student_t.ppf(0.975, 2 * (var / seeds_var) ** 2) * np.sqrt(var)
    d = first["difference"]
    assert (first["smaller"], first["larger"]) == ("small", "wide16") and d["n"] == 3
    assert d["diff"] == pytest.approx(7 / 6) and d["std_images"] == pytest.approx(0.6 * np.sqrt(4 / 3))
    assert d["low"] == pytest.approx(7 / 6 - half) and d["high"] == pytest.approx(7 / 6 + half)
    assert second["difference"]["std_images"] == pytest.approx(0.4)  # hypot(0.0, 0.4), 3 of 3 seeds
    assert second["difference"]["diff"] == pytest.approx(13 / 6)  # 2, 2, 2.5
    assert not first["holds"] and second["holds"] and not growth["holds"]
    # without the val-image noise the first step would hold (interval [0.45, 1.88]); with it, not
    bare = finding5({k: _summary(s["num_params"], s["num_classes"],
                                 {r["seed"]: r["diff"] for r in s["comparisons"][0]["per_seed"]}, 0.0)
                     for k, s in summaries.items()}, CFG)
    assert bare["steps"][0]["difference"]["low"] > 0 and d["low"] < 0
    assert bare["holds"]


def test_finding5_steps_need_two_shared_seeds_and_known_image_noise():
    from fqdetr.experiments.scaling import finding5
    one_shared = finding5({"a": _summary(100, 16, {0: 1.0, 1: 1.1}, 0.1),
                           "b": _summary(200, 16, {1: 3.0, 2: 3.1}, 0.1)}, CFG)
    step = one_shared["steps"][0]
    assert step["difference"]["n"] == 1 and step["difference"]["low"] > 0  # a zero-width "interval"
    assert not step["holds"] and not one_shared["holds"]
    unknown = {"a": _summary(100, 16, {0: 1.0, 1: 1.1}, 0.1), "b": _summary(200, 16, {0: 3.0, 1: 3.2}, 0.1)}
    del unknown["a"]["comparisons"][0]["across_seeds"]["std_images"]
    step = finding5(unknown, CFG)["steps"][0]
    assert step["difference"]["low"] > 0 and not step["holds"]
