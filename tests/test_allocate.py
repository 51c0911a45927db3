"""ILP bit allocation: optimal against brute force, constraints hold, clear errors."""
import itertools

import pytest
import torch

from fqdetr.allocate import (allocate_bits, quantization_error, random_sensitivity, sensitivities,
                             uniform_allocation)


def _instance(seed, layers=4, candidates=(2, 4, 8)):
    gen = torch.Generator().manual_seed(seed)
    sizes = {f"l{i}": int(torch.randint(10, 200, (1,), generator=gen)) for i in range(layers)}
    sens = {n: {b: float(torch.rand(1, generator=gen)) * 4.0 ** (-b) * (i + 1) for b in candidates}
            for i, n in enumerate(sizes)}
    return sizes, sens, candidates


def _brute_force(sizes, sens, candidates, budget, bounds=None):
    bounds = bounds or {}
    best, best_cost = None, float("inf")
    for combo in itertools.product(candidates, repeat=len(sizes)):
        alloc = dict(zip(sizes, combo))
        if any(not (bounds.get(n, (0, 99))[0] <= b <= bounds.get(n, (0, 99))[1]) for n, b in alloc.items()):
            continue
        if sum(sizes[n] * b for n, b in alloc.items()) > budget:
            continue
        cost = sum(sens[n][b] for n, b in alloc.items())
        if cost < best_cost:
            best, best_cost = alloc, cost
    return best, best_cost


@pytest.mark.parametrize("seed", range(6))
def test_ilp_is_optimal_against_brute_force(seed):
    sizes, sens, candidates = _instance(seed)
    budget = 4.0 * sum(sizes.values())  # an average of 4 bits
    bounds = {"l0": (8, 8)} if seed % 2 else None
    got = allocate_bits(sens, sizes, budget, candidates, bounds=bounds)
    want, want_cost = _brute_force(sizes, sens, candidates, budget, bounds)
    assert sum(sens[n][b] for n, b in got.items()) == pytest.approx(want_cost, rel=1e-9)
    assert sum(sizes[n] * b for n, b in got.items()) <= budget
    if bounds:
        assert got["l0"] == 8


def test_budget_forms_and_bops_constraint():
    sizes, sens, candidates = _instance(0)
    by_avg = allocate_bits(sens, sizes, {"avg_bits": 4}, candidates)
    by_bits = allocate_bits(sens, sizes, 4 * sum(sizes.values()), candidates)
    assert by_avg == by_bits
    macs = {n: 1000 * sizes[n] for n in sizes}
    a_bits = {n: 8 for n in sizes}
    bops = 0.9 * sum(macs[n] * by_avg[n] * 8 for n in sizes)
    tight = allocate_bits(sens, sizes, {"avg_bits": 4}, candidates, macs=macs, a_bits=a_bits, bops_budget=bops)
    assert sum(macs[n] * tight[n] * 8 for n in sizes) <= bops


def test_infeasible_budget_names_the_smallest_feasible():
    sizes = {"a": 10, "b": 30}
    sens = {n: {2: 1.0, 8: 0.0} for n in sizes}
    with pytest.raises(ValueError, match="smallest feasible size budget under these bounds is 140 bits"):
        allocate_bits(sens, sizes, 100, (2, 8), bounds={"a": (8, 8)})
    with pytest.raises(ValueError, match="admits none"):
        allocate_bits(sens, sizes, 1000, (2, 8), bounds={"a": (3, 4)})


def test_sensitivity_grows_as_bits_shrink_and_uniform_baseline():
    torch.manual_seed(0)
    weights = {"a": torch.randn(8, 16), "b": torch.randn(4, 16) * 3}
    sens = sensitivities(weights, {"a": 1.0, "b": 2.0}, (2, 4, 8))
    for layer in sens.values():
        assert layer[2] > layer[4] > layer[8] > 0
    assert quantization_error(weights["a"], 8) < quantization_error(weights["a"], 2)
    sizes = {n: w.numel() for n, w in weights.items()}
    assert uniform_allocation(sizes, {"avg_bits": 5}, (2, 4, 8)) == {"a": 4, "b": 4}
    rnd = random_sensitivity(sizes, (2, 4, 8), seed=1)
    assert set(rnd) == set(sizes) and rnd["a"][2] > rnd["a"][8]
    with pytest.raises(ValueError, match="traces"):
        sensitivities(weights, {"a": 1.0})


# ------------------------------------------------------------------ bad input and a_bits

@pytest.mark.parametrize("candidates, error, match", [
    ((2, 16), ValueError, "candidates: expected a bit-width in 2..8, got 16"),
    ((1, 4), ValueError, "got 1"),
    (("4",), TypeError, "candidates"),
    ((), ValueError, "at least one"),
    ("48", TypeError, "a sequence of bit-widths"),
])
def test_candidates_are_checked(candidates, error, match):
    sizes, sens, _ = _instance(0, candidates=(2, 4, 8))
    for call in (lambda: allocate_bits(sens, sizes, {"avg_bits": 4}, candidates),
                 lambda: uniform_allocation(sizes, {"avg_bits": 4}, candidates),
                 lambda: sensitivities({"l0": torch.ones(4, 4)}, {"l0": 1.0}, candidates)):
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("trace", [float("nan"), -1.0, float("inf"), "big"])
def test_fisher_traces_must_be_finite_and_non_negative(trace):
    weights = {"a": torch.randn(4, 4), "b": torch.randn(4, 4)}
    with pytest.raises(ValueError, match=r"traces\['b'\]: expected a"):
        sensitivities(weights, {"a": 1.0, "b": trace}, (2, 4))
    assert sensitivities(weights, {"a": 1.0, "b": 0.0}, (2, 4))["b"] == {2: 0.0, 4: 0.0}


@pytest.mark.parametrize("budget", [float("nan"), -8.0, 0, {"avg_bits": float("inf")}])
def test_budget_must_be_finite_and_positive(budget):
    sizes, sens, candidates = _instance(1)
    with pytest.raises(ValueError, match="budget: expected a finite size > 0"):
        allocate_bits(sens, sizes, budget, candidates)


def _quantizer_bits(module):
    """(weight bits, [activation bits]) of a quantized layer."""
    inputs = list(module.input_quantizers) if hasattr(module, "input_quantizers") else [module.input_quantizer]
    return module.weight_quantizer.bits, [q.bits for q in inputs]


def test_per_layer_a_bits_reach_the_model():
    """allocation.json's a_bits are run, not only reported (attention out_proj included)."""
    from fqdetr.engine.quantize import layer_weights, quantize_detr
    from fqdetr.models import build_detr
    from fqdetr.quant import quantized_modules

    model = build_detr("tiny", num_classes=3)
    names = list(layer_weights(quantize_detr(model)))
    allocation = {n: {"w_bits": 3 + i % 4, "a_bits": 4 + i % 3} for i, n in enumerate(names)}
    modules = quantized_modules(quantize_detr(model, allocation=allocation, a_bits=8))
    assert any(n.endswith("self_attn.out_proj") for n in names)
    for name, bits in allocation.items():
        assert _quantizer_bits(modules[name]) == (bits["w_bits"], [bits["a_bits"]] * (3 if name.endswith(
            "attn") else 1)), name


def test_allocate_cli_checks_its_numbers(tmp_path, capsys):
    import json

    from fqdetr.cli import main
    from fqdetr.models import build_detr, save_detr_checkpoint

    save_detr_checkpoint(build_detr("tiny", num_classes=3), tmp_path / "m.pth")
    common = ["allocate", "--model", str(tmp_path / "m.pth"), "--out", str(tmp_path)]
    for flag, value, message in (("--a-bits", "99", "expected a bit-width in 2..8, got 99"),
                                 ("--candidates", "4,16", "expected a bit-width in 2..8, got 16"),
                                 ("--budget", "nan", "expected a finite number > 0, got nan")):
        with pytest.raises(SystemExit) as exit_:
            main([*common, flag, value])
        assert exit_.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err
    from fqdetr.engine.quantize import layer_weights, quantize_detr
    from fqdetr.models import load_detr_checkpoint

    traces = {n: 1.0 for n in layer_weights(quantize_detr(load_detr_checkpoint(tmp_path / "m.pth")))}
    traces[next(iter(traces))] = float("nan")
    (tmp_path / "fisher.json").write_text(json.dumps({"critical": traces}))
    assert main([*common, "--fisher", str(tmp_path / "fisher.json")]) == 2
    err = capsys.readouterr().err
    assert "--fisher: " in err and "expected a finite Fisher trace >= 0, got nan" in err
