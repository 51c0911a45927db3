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
