"""The weight-code cache of fqdetr.quant.inference never serves stale codes: after an
optimizer step, a load_state_dict, a bit-width change, a new scale or a new parameter the
next no-grad call equals the autograd (uncached) forward; and it reuses codes otherwise."""
import copy
import pickle

import pytest
import torch
from torch import nn

from fqdetr.quant import QuantConfig, calibrate, quantize_model
from fqdetr.quant import inference
from fqdetr.quant.inference import clear_cache, set_inference_mode


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.conv(x).flatten(2).permute(2, 0, 1)  # [HW, B, 8]
        return self.head(self.attn(t, t, t)[0] + t)


def _model(integer):
    torch.manual_seed(0)
    q = quantize_model(Net(), QuantConfig(w_bits=4, a_bits=8))
    x = torch.randn(2, 3, 5, 6)
    calibrate(q, [x], progress=False)
    return set_inference_mode(q, integer), x


def _check_fresh(q, x):
    """The no-grad output equals the autograd output, computed from the current weights."""
    with torch.no_grad():
        fast = q(x)
    with torch.enable_grad():
        ref = q(x).detach()
    if any(m.integer_inference for m in q.modules() if hasattr(m, "integer_inference")):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(fast, ref)
    return fast


def _nudge(q):
    """An in-place change of every weight large enough to move many 4-bit codes."""
    with torch.no_grad():
        for p in q.parameters():
            if p.dim() > 1:
                p.mul_(-1.3)


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "adamw foreach", "adamw fused"])
def test_optimizer_step_invalidates(integer, optimizer):
    q, x = _model(integer)
    before = _check_fresh(q, x)
    params = [p for n, p in q.named_parameters() if not n.endswith("scale")]  # step sizes stay positive
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.5),
           "adamw": lambda: torch.optim.AdamW(params, lr=0.05, foreach=False),
           "adamw foreach": lambda: torch.optim.AdamW(params, lr=0.05, foreach=True),
           "adamw fused": lambda: torch.optim.AdamW(params, lr=0.05, fused=True)}[optimizer]()
    q(x).square().sum().backward()
    opt.step()
    after = _check_fresh(q, x)
    assert not torch.equal(before, after)


@pytest.mark.parametrize("integer", [False, True])
def test_load_state_dict_invalidates(integer):
    q, x = _model(integer)
    other = copy.deepcopy(q)
    _nudge(other)
    _check_fresh(q, x)
    q.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(q(x), other(x))
    _check_fresh(q, x)


@pytest.mark.parametrize("integer", [False, True])
def test_bits_scales_and_new_parameters_invalidate(integer):
    q, x = _model(integer)
    outputs = [_check_fresh(q, x)]
    q.head.weight_quantizer.set_bits(2)
    outputs.append(_check_fresh(q, x))
    with torch.no_grad():
        q.conv.input_quantizer.scale.mul_(1.7)  # the int8 convolution's weights are packed for this scale
        q.attn.weight_quantizer.scale.mul_(0.6)
    outputs.append(_check_fresh(q, x))
    q.conv.weight = nn.Parameter(q.conv.weight.detach() * -1)
    q.head.bias = nn.Parameter(q.head.bias.detach() + 1)
    outputs.append(_check_fresh(q, x))
    assert all(not torch.equal(a, b) for a, b in zip(outputs, outputs[1:]))


def test_codes_are_reused_until_a_change_and_data_writes_need_clear_cache(monkeypatch):
    q, x = _model(False)
    with torch.no_grad():
        q(x)
    builds = []
    real = inference._linear_codes
    monkeypatch.setattr(inference, "_linear_codes", lambda *a: builds.append(1) or real(*a))
    with torch.no_grad():
        first = q(x)
        assert torch.equal(q(x), first) and not builds  # three attention rows + out_proj + head cached
        q.head.weight.data.mul_(-1)  # bypasses the version counter
        assert torch.equal(q(x), first)
        clear_cache(q)
        assert not torch.equal(q(x), first) and len(builds) == 5
    _check_fresh(q, x)


def test_cached_models_still_copy_and_pickle():
    q, x = _model(True)
    with torch.no_grad():
        y = q(x)
        twin = pickle.loads(pickle.dumps(copy.deepcopy(q)))
        assert torch.equal(twin(x), y)
        _nudge(twin)
        assert not torch.equal(twin(x), y) and torch.equal(q(x), y)
