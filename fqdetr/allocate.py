"""Fisher-aware mixed-precision bit allocation (docs/METHOD.md section 3).

Sensitivity of layer l at b bits (HAWQ-V3 form, Fisher trace in place of the Hessian's):

    Omega_l(b) = tr(F_l) / n_l * || Q_b(W_l) - W_l ||^2

Allocation: the integer linear program, one bit-width per layer,

    min sum_{l,b} x_{l,b} Omega_l(b)
    s.t. sum_b x_{l,b} = 1,  sum_{l,b} x_{l,b} n_l b <= size budget (bits),
         optional sum x_{l,b} MACs_l * b * a_bits_l <= BOPs budget, per-layer bounds,

solved exactly with scipy.optimize.milp (HiGHS branch and bound).
"""
import logging
import math

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from fqdetr.quant.quantizer import scale_from_data
from fqkernels import reference
from fqkernels.checks import check_bits

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = (2, 3, 4, 5, 6, 8)


def quantization_error(weight, bits, method="max"):
    """||Q_b(W) - W||^2 with a per-output-channel symmetric quantizer (float)."""
    w = weight.detach().float()
    s = scale_from_data(w, bits, True, axis=0, method=method)
    return float((reference.fake_quant_forward(w, s, bits, True, axis=0) - w).square().sum())


def check_candidates(candidates):
    """``candidates`` as a sorted tuple of distinct bit-widths the quantizers support (2..8);
    ValueError / TypeError naming the first bad one."""
    if isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__iter__"):
        raise TypeError(f"candidates: expected a sequence of bit-widths, got {candidates!r}")
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("candidates: expected at least one bit-width")
    for b in candidates:
        check_bits(int(b) if isinstance(b, np.integer) else b, "candidates")
    return tuple(sorted({int(b) for b in candidates}))


def _check_trace(name, value):
    """A Fisher trace as a float; ValueError unless finite and >= 0 (a trace of a PSD matrix)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"traces[{name!r}]: expected a number, got {value!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"traces[{name!r}]: expected a finite Fisher trace >= 0, got {value}")
    return value


def sensitivities(weights, traces, candidates=DEFAULT_CANDIDATES):
    """{layer: {bits: Omega_l(bits)}} from weights {layer: tensor} and traces {layer: tr(F_l)}."""
    candidates = check_candidates(candidates)
    missing = set(weights) - set(traces)
    if missing:
        raise ValueError(f"traces: no Fisher trace for layers {sorted(missing)}")
    out = {}
    for name, w in weights.items():
        trace = _check_trace(name, traces[name])
        out[name] = {b: trace / w.numel() * quantization_error(w, b) for b in candidates}
    return out


def _parse_budget(budget, sizes):
    """A size budget in bits from a number of bits, {"mb": x}, or {"avg_bits": x}."""
    total = sum(sizes.values())
    if isinstance(budget, dict):
        if set(budget) == {"avg_bits"}:
            bits = float(budget["avg_bits"]) * total
        elif set(budget) == {"mb"}:
            bits = float(budget["mb"]) * 8 * 1024 * 1024
        else:
            raise ValueError(f"budget: expected a number of bits, {{'avg_bits': x}} or {{'mb': x}}, got {budget}")
    else:
        bits = float(budget)
    if not (math.isfinite(bits) and bits > 0):
        raise ValueError(f"budget: expected a finite size > 0, got {budget}")
    return bits


def _allowed(name, candidates, bounds):
    lo, hi = bounds.get(name, (min(candidates), max(candidates)))
    allowed = [b for b in candidates if lo <= b <= hi]
    if not allowed:
        raise ValueError(f"bounds[{name!r}] = {(lo, hi)} admits none of the candidate bits {list(candidates)}")
    return allowed


def allocate_bits(sensitivity, sizes, budget, candidates=DEFAULT_CANDIDATES, bounds=None, macs=None,
                  a_bits=None, bops_budget=None):
    """Chooses w_bits per layer minimising total sensitivity under the budgets.

    sensitivity: {layer: {bits: cost}}; sizes: {layer: n_params}; budget: size budget in bits,
    or {"avg_bits": x}, or {"mb": x}; bounds: {layer: (min_bits, max_bits)};
    macs / a_bits / bops_budget: optional BOPs constraint (MACs_l * w_bits * a_bits_l).
    Returns {layer: w_bits}. Raises ValueError naming the smallest feasible budget when the
    budget cannot be met.
    """
    bounds, names = bounds or {}, list(sizes)
    candidates = check_candidates(candidates)
    budget_bits = _parse_budget(budget, sizes)
    choices = [(n, b) for n in names for b in _allowed(n, candidates, bounds)]
    smallest = sum(sizes[n] * min(_allowed(n, candidates, bounds)) for n in names)
    if budget_bits < smallest - 1e-6:
        avg = smallest / max(sum(sizes.values()), 1)
        raise ValueError(f"budget: {budget_bits:.0f} bits is infeasible; the smallest feasible size budget under "
                         f"these bounds is {smallest:.0f} bits (average {avg:.3f} bits per weight)")
    cost = np.array([sensitivity[n][b] for n, b in choices], dtype=np.float64)
    one_per_layer = np.array([[1.0 if c[0] == n else 0.0 for c in choices] for n in names])
    rows = [LinearConstraint(one_per_layer, 1, 1),
            LinearConstraint(np.array([[sizes[n] * b for n, b in choices]]), -np.inf, budget_bits)]
    if bops_budget is not None:
        if macs is None or a_bits is None:
            raise ValueError("bops_budget: needs macs {layer: MACs} and a_bits {layer: bits}")
        rows.append(LinearConstraint(np.array([[macs[n] * b * a_bits[n] for n, b in choices]]), -np.inf,
                                     bops_budget))
    res = milp(cost, constraints=rows, integrality=np.ones(len(choices)), bounds=Bounds(0, 1))
    if res.status != 0 or res.x is None:
        raise ValueError(f"budget: no allocation satisfies the constraints ({res.message})")
    picked = {n: b for (n, b), x in zip(choices, res.x) if x > 0.5}
    log.info("allocate_bits: %d layers, %.3f average bits, objective %.4g", len(picked),
             sum(sizes[n] * b for n, b in picked.items()) / sum(sizes.values()), res.fun)
    return picked


def uniform_allocation(sizes, budget, candidates=DEFAULT_CANDIDATES, bounds=None):
    """The largest single bit-width (for unbounded layers) that fits the budget."""
    budget_bits = _parse_budget(budget, sizes)
    bounds, candidates = bounds or {}, check_candidates(candidates)
    for b in sorted(candidates, reverse=True):
        alloc = {n: min(max(b, min(_allowed(n, candidates, bounds))), max(_allowed(n, candidates, bounds)))
                 for n in sizes}
        if sum(sizes[n] * alloc[n] for n in sizes) <= budget_bits + 1e-6:
            return alloc
    raise ValueError(f"budget: {budget_bits:.0f} bits fits no uniform bit-width in {list(candidates)}")


def random_sensitivity(sizes, candidates=DEFAULT_CANDIDATES, seed=0):
    """Random layer importances (the "random" baseline): decreasing in bits, random scale per layer."""
    candidates = check_candidates(candidates)
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(len(sizes), generator=gen).tolist()
    return {n: {b: s * 4.0 ** (-b) for b in candidates} for n, s in zip(sizes, scale)}
