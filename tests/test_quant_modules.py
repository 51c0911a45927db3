"""Quantized modules on a small model with Linear, Conv2d and MultiheadAttention."""

import pytest
import torch
from torch import nn

from fqdetr.quant import (QuantConfig, QuantConv2d, QuantLinear, QuantMultiheadAttention, Quantizer, calibrate,
                          export_quantized, quantize_model, scale_from_data, set_fake_quant, to_float)
from fqkernels import reference


class SmallNet(nn.Module):
    """conv -> tokens -> linear -> self-attention -> head; ``batch_first`` picks the MHA layout."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.proj = nn.Linear(16, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)
        self.batch_first = batch_first

    def forward(self, x):
        tokens = self.proj(self.conv(x).flatten(2).permute(2, 0, 1))  # [HW, B, C]
        if self.batch_first:
            tokens = tokens.transpose(0, 1)
        out, _ = self.attn(tokens, tokens, tokens)
        return self.head(self.norm(out + tokens))


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("batch_first", [False, True])
def test_8bit_close_2bit_differs_and_gradients_flow(batch_first):
    model = SmallNet(batch_first)
    x = torch.randn(2, 3, 6, 5)
    ref = model(x)
    q8 = quantize_model(model, QuantConfig(w_bits=8, a_bits=8, quantize_attention=True))
    q2 = quantize_model(model, QuantConfig(w_bits=2, a_bits=2, quantize_attention=True))
    # 8-bit steps are ~1/255 of each range: outputs within a few percent; 2-bit (4 levels) far off.
    assert _relative_error(q8(x), ref) < 0.05
    assert _relative_error(q2(x), ref) > 0.2
    out = q2(x)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in q2.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


@pytest.mark.parametrize("batch_first", [False, True])
def test_disabled_fake_quant_is_the_float_model(batch_first):
    model = SmallNet(batch_first)
    x = torch.randn(2, 3, 4, 4)
    q = set_fake_quant(quantize_model(model, QuantConfig(w_bits=2, a_bits=2, quantize_attention=True)), False)
    # Same math in a different kernel order (our MHA is written out, torch's is fused): fp32 rounding only.
    torch.testing.assert_close(q(x), model(x), rtol=1e-5, atol=1e-5)


def _masks(L, S, N, heads):
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, -2:] = True
    bool_mask = torch.zeros(L, S, dtype=torch.bool)
    bool_mask[:, 0] = True
    return [
        {"key_padding_mask": kpm},
        {"attn_mask": bool_mask},
        {"attn_mask": torch.randn(L, S)},
        {"attn_mask": torch.randn(N * heads, L, S), "key_padding_mask": kpm},
        {"key_padding_mask": kpm.float() * -1e4, "need_weights": True, "average_attn_weights": False},
    ]


@pytest.mark.parametrize("batch_first", [False, True])
def test_attention_masks_match_torch(batch_first):
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first)
    q = QuantMultiheadAttention.from_float(mha)
    q.fake_quant_enabled = False
    q.out_proj.fake_quant_enabled = False
    L, S, N = 5, 7, 2
    shape = (lambda n, t: (n, t, 12)) if batch_first else (lambda n, t: (t, n, 12))
    query, key = torch.randn(*shape(N, L)), torch.randn(*shape(N, S))
    for kwargs in _masks(L, S, N, 3):
        out, w = q(query, key, key, **kwargs)
        out_ref, w_ref = mha(query, key, key, **kwargs)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-5)


def test_config_overrides_globs_skip_and_json(tmp_path):
    config = QuantConfig(w_bits=4, a_bits=8, layers={"head": {"w_bits": 8}, "pro*": {"a_bits": None}},
                         skip=["conv"])
    q, report = quantize_model(SmallNet(), config, return_report=True)
    assert isinstance(q.conv, nn.Conv2d) and not isinstance(q.conv, QuantConv2d)
    assert q.head.weight_quantizer.bits == 8 and q.attn.weight_quantizer.bits == 4
    assert q.proj.input_quantizer is None
    assert report.skipped == ["conv"] and "norm" in report.left_float and set(report.swapped) == {
        "proj", "attn", "head"}
    path = tmp_path / "q.json"
    config.save(path)
    assert QuantConfig.load(path) == config
    yaml_path = tmp_path / "q.yaml"
    yaml_path.write_text("w_bits: 3\nlayers:\n  head: {w_bits: 6}\n")
    assert QuantConfig.load(yaml_path).for_layer("head").w_bits == 6


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: QuantConfig(w_bits=9), "w_bits"),
        (lambda: QuantConfig(a_bits=1), "a_bits"),
        (lambda: QuantConfig(calibration="minmax"), "calibration"),
        (lambda: QuantConfig(layers={"head": {"wbits": 8}}), "unknown fields"),
        (lambda: QuantConfig.from_dict({"w_bits": 4, "colour": 1}), "unknown keys"),
        (lambda: quantize_model(SmallNet(), QuantConfig(layers={"heda": {"w_bits": 8}})), "heda"),
        (lambda: quantize_model(SmallNet(), {"w_bits": 4}), "config"),
    ],
)
def test_bad_config_is_a_clear_error(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        QuantConfig.load(bad)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        QuantConfig.load(bad_yaml)  # the safe loader refuses arbitrary objects


@pytest.mark.parametrize("method", ["max", "percentile", "mse"])
def test_calibration_methods(method):
    x = torch.randn(4000)
    x[0] = 40.0  # an outlier: percentile and MSE clip it, max does not
    s = scale_from_data(x, 4, True, method=method, percentile=99.0)
    err = (reference.fake_quant_forward(x, s, 4, True) - x).square().mean()
    err_max = (reference.fake_quant_forward(x, scale_from_data(x, 4, True), 4, True) - x).square().mean()
    if method == "max":
        assert s.item() == pytest.approx(40.0 / 7)
    else:
        assert s.item() < 40.0 / 7 and err < err_max


def test_calibrate_over_batches_sets_activation_scales():
    model = quantize_model(SmallNet(), QuantConfig(w_bits=8, a_bits=8))
    batches = [torch.randn(2, 3, 5, 5) * (i + 1) for i in range(3)]
    calibrate(model, batches, method="max", progress=False)
    # The conv input quantizer saw max |x| of all batches (the largest is in the third).
    expected = max(b.abs().max() for b in batches) / 127
    assert model.conv.input_quantizer.scale.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="batches"):
        calibrate(model, [], progress=False)


def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


def test_quantize_model_keeps_each_module_mode():
    model = SmallNet()
    model.attn.dropout = 0.5  # attention dropout is only off in eval mode
    x = torch.randn(2, 3, 4, 4)
    q = quantize_model(model.eval())
    assert not any(_modes(q).values())
    torch.testing.assert_close(q(x), q(x), rtol=0, atol=0)
    model.train()
    model.head.eval()
    model.attn.out_proj.eval()
    q = quantize_model(model)
    assert q.attn.training and q.proj.training and q.conv.input_quantizer.training
    assert not q.head.training and not q.head.weight_quantizer.training and not q.attn.out_proj.training


class KeywordNet(nn.Module):
    """Takes its images by keyword, as transformers' DetrForObjectDetection does."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)

    def forward(self, *, pixel_values, scale=1.0):
        return self.proj(pixel_values.permute(0, 2, 3, 1) * scale)


def test_calibrate_dict_batches_are_keyword_inputs():
    model = quantize_model(KeywordNet(), QuantConfig(a_bits=8, a_signed=True))
    batches = [{"pixel_values": torch.randn(2, 3, 4, 4)}, {"pixel_values": torch.randn(1, 3, 5, 5), "scale": 3.0}]
    calibrate(model, batches, progress=False)
    expected = max(batches[0]["pixel_values"].abs().max(), 3.0 * batches[1]["pixel_values"].abs().max()) / 127
    assert model.proj.input_quantizer.scale.item() == pytest.approx(expected.item(), rel=1e-6)


def test_calibrate_that_raises_restores_quantizers_and_modes():
    model = quantize_model(SmallNet(), QuantConfig(w_bits=8, a_bits=8))
    model(torch.randn(1, 3, 4, 4))  # initialises the activation scales
    model.train()
    model.norm.eval()
    modes, scales = _modes(model), {n: p.clone() for n, p in model.named_parameters() if n.endswith("scale")}
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]

    def fails_on_second(m, batch):
        if batch.shape[0] == 2:
            raise RuntimeError("bad batch")
        m(batch)

    with pytest.raises(RuntimeError, match="bad batch"):
        calibrate(model, [torch.randn(1, 3, 4, 4) * 9, torch.randn(2, 3, 4, 4)], forward_fn=fails_on_second,
                  method="mse", progress=False)
    assert not any(q.observing for q in quantizers)
    assert all(q.method == "max" for q in quantizers)
    assert _modes(model) == modes
    for name, p in model.named_parameters():
        if name.endswith("scale"):
            torch.testing.assert_close(p, scales[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="batches"):
        calibrate(model, [], progress=False)
    assert not any(q.observing for q in quantizers)


def test_export_codes_reproduce_fake_quantized_weights(tmp_path):
    model = quantize_model(SmallNet(), QuantConfig(w_bits=3, a_bits=8))
    exported = export_quantized(model)
    assert set(exported) == {"conv", "proj", "attn", "attn.out_proj", "head"}
    for name, module in [("proj", model.proj), ("head", model.head)]:
        e = exported[name]
        assert e["weight_codes"].dtype == torch.int8 and e["weight_codes"].abs().max() <= 4
        wq = module.weight_quantizer
        fq = reference.fake_quant_forward(module.weight.detach(), wq.scale.detach(), 3, True, axis=0)
        assert torch.equal(e["weight_codes"].float() * e["weight_scale"][:, None], fq)


def test_state_dict_round_trip_keeps_bits_and_float_names(tmp_path):
    model = SmallNet()
    q = quantize_model(model, QuantConfig(w_bits=5, a_bits=6))
    x = torch.randn(1, 3, 4, 4)
    y = q(x)
    path = tmp_path / "q.pt"
    torch.save(q.state_dict(), path)
    fresh = quantize_model(SmallNet(), QuantConfig(w_bits=8, a_bits=8))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.proj.weight_quantizer.bits == 5 and fresh.proj.input_quantizer.bits == 6
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    # The float parameter names are unchanged, so a float checkpoint loads as it is.
    float_keys = set(model.state_dict())
    assert float_keys <= set(q.state_dict())
    back = to_float(q)
    assert type(back.attn) is nn.MultiheadAttention and type(back.proj) is nn.Linear
    torch.testing.assert_close(back(x), model(x))


def test_set_bits_keeps_clipping_range():
    qz = Quantizer(8, True)
    qz.init_from(torch.tensor([-2.0, 1.0]))
    qz.set_bits(4)
    assert qz.scale.item() * 7 == pytest.approx(2.0)


def test_quantized_modules_are_drop_in():
    lin = QuantLinear(7, 3)
    conv = QuantConv2d(3, 4, 3, stride=2, groups=1)
    assert lin(torch.randn(2, 5, 7)).shape == (2, 5, 3)
    assert conv(torch.randn(1, 3, 9, 9)).shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="x: expected last dimension"):
        lin(torch.randn(2, 6))
