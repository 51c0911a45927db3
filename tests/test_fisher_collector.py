"""FisherCollector against per-sample autograd (one backward per image) on small models."""
import pytest
import torch
from torch import nn

from fqdetr.fisher import FisherCollector
from fqdetr.quant import QuantConfig, quantize_model, set_fake_quant


class Block(nn.Module):
    """conv (stride/padding/groups) -> tokens (sequence-first) -> MHA -> FFN -> head on [N, T, C]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.attn = nn.MultiheadAttention(8, 2)
        self.ffn = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.conv(x).flatten(2).permute(2, 0, 1)  # [T, N, C]
        t = t + self.attn(t, t, t)[0]
        t = t + self.ffn(t)
        return self.head(t.transpose(0, 1))  # [N, T, 3]


def per_image_losses(model, x, target):
    return (model(x) - target).square().sum(dim=(1, 2))


def oracle(model, x, target, names):
    """sum_n g_n^2 by one backward per image."""
    weights = {n: (m.in_proj_weight if isinstance(m, nn.MultiheadAttention) else m.weight)
               for n, m in model.named_modules() if n in names}
    out = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    for i in range(x.shape[0]):
        model.zero_grad()
        per_image_losses(model, x[i:i + 1], target[i:i + 1]).sum().backward()
        for n, w in weights.items():
            out[n] += w.grad.double().square()
    return out


BATCH_DIMS = {"ffn.*": 1}  # sequence-first inside the block; head sees [N, T, C]


@pytest.mark.parametrize("fake_quant", [False, True])
def test_collector_matches_per_sample_autograd(fake_quant):
    torch.manual_seed(0)
    model = quantize_model(Block(), QuantConfig(w_bits=4, a_bits=8))
    set_fake_quant(model, fake_quant)
    x, target = torch.randn(5, 4, 7, 6), torch.randn(5, 12, 3)
    model(x)  # initialise activation scales before comparing
    with FisherCollector(model, batch_dims=BATCH_DIMS) as fc:
        fc.backward(per_image_losses(model, x, target))
    expected = oracle(model, x, target, set(fc.sums))
    assert set(expected) == {"conv", "attn", "attn.out_proj", "ffn.0", "ffn.2", "head"}
    for name, want in expected.items():
        # fp32 sums of T*K products per element, squared and summed over 5 images; the oracle
        # runs the same products in another order: relative error ~1e-6, bound 1e-5.
        got = fc.sums[name].double()
        assert (got - want).norm() / want.norm() < 1e-5, name
    assert fc.num_samples == 5
    traces = fc.traces()
    assert traces["head"] == pytest.approx(expected["head"].sum().item() / 5, rel=1e-5)


@pytest.mark.parametrize("fake_quant", [False, True])
def test_collecting_leaves_the_gradients_unchanged(fake_quant):
    """The quantized layers' backward takes dW from the Fisher pass while collecting: every
    parameter's gradient (weights, biases, LSQ scales) must equal the plain backward's."""
    torch.manual_seed(0)
    model = quantize_model(Block(), QuantConfig(w_bits=4, a_bits=8))
    set_fake_quant(model, fake_quant)
    x, target = torch.randn(4, 4, 7, 6), torch.randn(4, 12, 3)
    model(x)
    per_image_losses(model, x, target).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with FisherCollector(model, batch_dims=BATCH_DIMS) as fc:
        fc.backward(per_image_losses(model, x, target))
    collected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(collected) == set(plain)
    for name, want in plain.items():
        # Same fp32 products summed per sample first: ~1e-6 relative, bound 1e-5.
        assert (collected[name] - want).norm() <= 1e-5 * want.norm().clamp_min(1e-12), name


def test_accumulating_batches_equals_one_big_batch(tmp_path):
    torch.manual_seed(0)
    model = quantize_model(Block(), QuantConfig(w_bits=4, a_bits=8))
    x, target = torch.randn(6, 4, 7, 6), torch.randn(6, 12, 3)
    model(x)
    with FisherCollector(model, batch_dims=BATCH_DIMS) as big:
        big.backward(per_image_losses(model, x, target))
    with FisherCollector(model, batch_dims=BATCH_DIMS) as a:
        a.backward(per_image_losses(model, x[:2], target[:2]))
        a.backward(per_image_losses(model, x[2:4], target[2:4]))
    with FisherCollector(model, batch_dims=BATCH_DIMS) as b:
        b.backward(per_image_losses(model, x[4:], target[4:]))
    b.save(tmp_path / "b.pt")
    a.merge(FisherCollector.load(tmp_path / "b.pt"))
    for name in big.sums:
        torch.testing.assert_close(a.sums[name], big.sums[name], rtol=1e-5, atol=1e-7)
    assert a.counts == big.counts
    # The context detached everything: later backward passes add nothing.
    before = {n: s.clone() for n, s in a.sums.items()}
    per_image_losses(model, x, target).sum().backward()
    assert all(torch.equal(before[n], a.sums[n]) for n in before)


def test_batch_coupled_losses_are_refused():
    model = quantize_model(Block(), QuantConfig())
    x, target = torch.randn(2, 4, 7, 6), torch.randn(2, 12, 3)
    with FisherCollector(model, batch_dims=BATCH_DIMS) as fc:
        with pytest.raises(ValueError, match="per_image_losses"):
            fc.backward(per_image_losses(model, x, target).mean())
    bn_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="BatchNorm"):
        FisherCollector(bn_model).__enter__()
    with pytest.raises(ValueError, match="MultiheadAttention"):
        FisherCollector(Block())
    with pytest.raises(ValueError, match="layers"):
        FisherCollector(model, layers=["nothing*"])


@pytest.mark.parametrize("fake_quant", [False, True])
def test_frozen_layers_keep_frozen_scales_and_still_get_their_fisher(fake_quant):
    """A layer frozen before quantization (DETR's stem and layer1) gets frozen step sizes, so a
    training backward stops above it; the collector still reaches it (its weight requires grad
    inside the context only) and its Fisher equals the per-image oracle's."""
    torch.manual_seed(0)
    float_model = Block()
    float_model.conv.requires_grad_(False)
    model = quantize_model(float_model, QuantConfig(w_bits=4, a_bits=8))
    set_fake_quant(model, fake_quant)
    conv_scales = [model.conv.weight_quantizer.scale, model.conv.input_quantizer.scale]
    assert not any(s.requires_grad for s in conv_scales)
    assert model.head.weight_quantizer.scale.requires_grad and model.head.input_quantizer.scale.requires_grad
    x, target = torch.randn(3, 4, 7, 6), torch.randn(3, 12, 3)
    model(x)
    per_image_losses(model, x, target).sum().backward()
    assert model.conv.weight.grad is None and all(s.grad is None for s in conv_scales)
    model.zero_grad(set_to_none=True)
    with FisherCollector(model, batch_dims=BATCH_DIMS) as fc:
        fc.backward(per_image_losses(model, x, target))
    assert not model.conv.weight.requires_grad  # restored on exit
    assert fc.counts["conv"] == 3
    model.conv.weight.requires_grad_(True)
    want = oracle(model, x, target, {"conv"})["conv"]
    # As in test_collector_matches_per_sample_autograd: fp32 sums in another order, bound 1e-5.
    assert want.norm() > 0
    assert (fc.sums["conv"].double() - want).norm() / want.norm() < 1e-5


def test_a_collector_that_fails_to_attach_leaves_the_model_as_it_was(monkeypatch):
    """Setting up half-way and failing must not leave frozen weights requiring grad, forward
    hooks counting, or fused layers accumulating into a collector nobody reads."""
    float_model = Block()
    float_model.conv.requires_grad_(False)
    model = quantize_model(float_model, QuantConfig(w_bits=4, a_bits=8))
    collector = FisherCollector(model, batch_dims=BATCH_DIMS)
    attach, attached = collector._attach, []

    def attach_then_fail(name, module):
        if len(attached) == 3:
            raise RuntimeError("attach failed")
        attach(name, module)
        attached.append(name)

    monkeypatch.setattr(collector, "_attach", attach_then_fail)
    with pytest.raises(RuntimeError, match="attach failed"):
        collector.__enter__()
    assert not model.conv.weight.requires_grad
    assert all(getattr(m, "fisher_accumulator", None) is None for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
