"""fqdetr.sensitivity.hutchinson_traces: the estimate, negative traces, and the all-reduce of its
sums under several processes (simulated: the reduction is what torchrun changes)."""
import logging

import pytest
import torch
from torch import nn

import fqdetr.sensitivity as sensitivity
from fqdetr.quant import QuantConfig, quantize_model, set_fake_quant


class Toy(nn.Module):
    """A detector-shaped linear model: (images [B, 4], mask) -> outputs [B, 3]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, inputs):
        return self.fc(inputs[0])


def _toy(seed=0):
    torch.manual_seed(seed)
    model = quantize_model(Toy(), QuantConfig(w_bits=8, a_bits=8))
    set_fake_quant(model, False)  # a float layer: tr(H) is known in closed form
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    return model, [(x[i:i + 2], None, [None, None]) for i in range(0, 6, 2)], x


def _squares(sign):
    """Per-image loss sign * ||W x_n + b||^2: d2/dW2 = sign * 2 I_3 (x) x x^T, trace sign * 6 ||x_n||^2."""
    return lambda out, targets: sign * out.square().sum(-1)


def test_hutchinson_estimates_the_hessian_trace():
    model, loader, x = _toy()
    traces = sensitivity.hutchinson_traces(model, loader, _squares(1.0), probes=400, progress=False)
    exact = 6 * x.square().sum(-1).mean().item()
    assert traces["fc"] == pytest.approx(exact, rel=0.05)


def test_negative_estimates_are_clipped_with_a_warning(caplog):
    model, loader, _ = _toy()
    with caplog.at_level(logging.WARNING, logger="fqdetr.sensitivity"):
        traces = sensitivity.hutchinson_traces(model, loader, _squares(-1.0), probes=2, progress=False)
    assert traces == {"fc": 0.0}
    assert "negative" in caplog.text and "fc" in caplog.text
    assert sensitivity.clip_negative_traces({"a": -2.0, "b": 3.0}) == {"a": 0.0, "b": 3.0}


def test_several_processes_reduce_sums_and_counts(monkeypatch):
    """Two simulated processes, one with 2 images and one with 4: each reduces its per-layer sum
    and its image count, so the result is the mean over all 6 images, not the mean of the two
    processes' means; and each process draws its own probes (seeded by its rank)."""
    model, loader, _ = _toy()
    captured = []
    monkeypatch.setattr(sensitivity, "all_reduce_sum", lambda t: captured.append(t.clone()) or t)
    monkeypatch.setattr(sensitivity, "clip_negative_traces", lambda traces: traces)
    alone = {}
    for r, shard in ((0, loader[:1]), (1, loader[1:])):
        monkeypatch.setattr(sensitivity, "rank", lambda r=r: r)
        alone[r] = sensitivity.hutchinson_traces(model, shard, _squares(1.0), progress=False)["fc"]
    (sums0, count0, sums1, count1) = captured
    assert (count0.item(), count1.item()) == (2.0, 4.0)
    assert alone[0] == pytest.approx(sums0.item() / 2) and alone[1] == pytest.approx(sums1.item() / 4)
    # rank 0 again, now with rank 1's sums arriving through the all-reduce
    others = iter([sums1, count1])
    monkeypatch.setattr(sensitivity, "all_reduce_sum", lambda t: t.add_(next(others)))
    monkeypatch.setattr(sensitivity, "rank", lambda: 0)
    reduced = sensitivity.hutchinson_traces(model, loader[:1], _squares(1.0), progress=False)["fc"]
    assert reduced == pytest.approx((2 * alone[0] + 4 * alone[1]) / 6, rel=1e-12)
    assert reduced != pytest.approx((alone[0] + alone[1]) / 2, rel=1e-6)
    monkeypatch.setattr(sensitivity, "all_reduce_sum", lambda t: t)
    monkeypatch.setattr(sensitivity, "rank", lambda: 1)
    assert sensitivity.hutchinson_traces(model, loader[:1], _squares(1.0), progress=False)["fc"] != alone[0]

