"""Integer inference (fqdetr.quant.inference): no-grad linears bit-identical to the fake-quant
forward, int8 convolutions within the stated tolerance, and the autograd path wherever a
gradient, a calibration or a Fisher collection needs it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqdetr.fisher import FisherCollector
from fqdetr.models import build_detr
from fqdetr.quant import QuantConfig, QuantConv2d, QuantLinear, QuantMultiheadAttention, calibrate, quantize_model
from fqdetr.quant.config import LayerQuantConfig
from fqdetr.quant.inference import CONV_RTOL, set_inference_mode
from fqkernels import reference


def _calibrated(module, x):
    module(x)  # the first call sets the activation scales
    return module


def _both(module, *args):
    """(autograd fake-quant forward, no-grad forward) of module(*args)."""
    with torch.enable_grad():
        ref = module(*args)
    with torch.no_grad():
        fast = module(*args)
    return ref, fast


@pytest.mark.parametrize("w_bits,a_bits,a_signed", [(4, 8, True), (4, 8, False), (8, 4, False), (2, 6, True)])
def test_no_grad_linear_is_bit_identical(w_bits, a_bits, a_signed):
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(40, 24), LayerQuantConfig(w_bits=w_bits, a_bits=a_bits, a_signed=a_signed))
    x = torch.randn(3, 7, 40)
    ref, fast = _both(_calibrated(q, x), x)
    assert ref.requires_grad and not fast.requires_grad
    assert torch.equal(ref, fast)


@pytest.mark.parametrize("batch_first", [False, True])
def test_no_grad_attention_is_bit_identical(batch_first):
    torch.manual_seed(0)
    q = QuantMultiheadAttention.from_float(nn.MultiheadAttention(32, 4, batch_first=batch_first),
                                           LayerQuantConfig(w_bits=4, a_bits=8))
    x, kpm = torch.randn((2, 6, 32) if batch_first else (6, 2, 32)), torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, -2:] = True
    q(x, x, x, key_padding_mask=kpm)
    ref, fast = _both(q, x, x, x, None, True)
    assert torch.equal(ref[0], fast[0]) and torch.equal(ref[1], fast[1])


CONVS = {  # name: (Conv2d kwargs, LayerQuantConfig kwargs, input shape)
    "3x3 signed a8": (dict(in_channels=8, out_channels=12, kernel_size=3, padding=1), dict(a_bits=8), (2, 8, 9, 11)),
    "7x7 stride 2 (stem)": (dict(in_channels=3, out_channels=8, kernel_size=7, stride=2, padding=3, bias=False),
                            dict(a_bits=8), (2, 3, 20, 17)),
    "1x1 unsigned a8": (dict(in_channels=16, out_channels=8, kernel_size=1), dict(a_bits=8, a_signed=False),
                        (3, 16, 5, 4)),
    "dilated grouped unsigned a4": (dict(in_channels=8, out_channels=8, kernel_size=3, padding=2, dilation=2,
                                         groups=2), dict(a_bits=4, a_signed=False, w_bits=2), (2, 8, 10, 9)),
}


@pytest.mark.parametrize("case", list(CONVS))
def test_integer_conv_within_stated_tolerance(case):
    conv_kw, cfg_kw, shape = CONVS[case]
    torch.manual_seed(0)
    q = QuantConv2d.from_float(nn.Conv2d(**conv_kw), LayerQuantConfig(**cfg_kw))
    x = torch.randn(shape)
    if cfg_kw.get("a_signed") is False:
        x = x.relu()
    ref, cached = _both(_calibrated(q, x), x)
    assert torch.equal(ref, cached)  # without inference mode: cached fake-quantized weight, same conv
    with torch.no_grad():
        set_inference_mode(q)
        y = q(x)
        # a channels-last input (what the previous int8 convolution returns) is read in place
        assert torch.equal(q(x.contiguous(memory_format=torch.channels_last)), y)
    aq, wq = q.input_quantizer, q.weight_quantizer
    xq = reference.fake_quant_forward(x, aq.scale, aq.bits, aq.signed)
    wfq = reference.fake_quant_forward(q.weight.detach(), wq.scale.detach(), wq.bits, True, axis=0)
    bound = F.conv2d(xq.abs(), wfq.abs(), None, q.stride, q.padding, q.dilation, q.groups)
    bound = bound + (q.bias.detach().abs()[:, None, None] if q.bias is not None else 0)
    err = (y - ref).abs()
    assert (err <= CONV_RTOL * bound + 1e-30).all(), f"max error {err.max()} (bound {CONV_RTOL * bound.max()})"
    assert not torch.equal(y, F.conv2d(x, q.weight, q.bias, q.stride, q.padding, q.dilation, q.groups))


def test_fallbacks_take_the_fake_quant_path():
    torch.manual_seed(0)
    conv = set_inference_mode(QuantConv2d.from_float(nn.Conv2d(4, 4, 3, padding=1), LayerQuantConfig(a_bits=8)))
    x = torch.randn(1, 4, 6, 6)
    conv(x)
    x_nan = x.clone()
    x_nan[0, 0, 0, 0] = float("nan")
    ref, fast = _both(conv, x_nan)  # NaN has no integer code: the fake-quant path, NaN spreading the same way
    assert fast.isnan().any() and torch.equal(ref.isnan(), fast.isnan())
    assert torch.equal(ref.nan_to_num(), fast.nan_to_num())
    y = conv(x)  # gradient needed: autograd path, gradients reach the weight and both scales
    y.sum().backward()
    assert conv.weight.grad is not None and conv.weight_quantizer.scale.grad is not None
    assert conv.input_quantizer.scale.grad is not None


def test_calibration_still_observes_without_gradients():
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), QuantConfig(a_bits=8))
    calibrate(model, [torch.randn(5, 8)], progress=False)
    before = model[2].input_quantizer.scale.clone()
    calibrate(model, [torch.randn(5, 8) * 10], progress=False)  # calibrate runs under no_grad
    assert not torch.equal(model[2].input_quantizer.scale, before)


def _tiny_detr():
    torch.manual_seed(0)
    model = build_detr("tiny", num_classes=5, norm="batch").eval()
    images, mask = torch.randn(2, 3, 48, 64), torch.zeros(2, 48, 64, dtype=torch.bool)
    mask[1, :, 48:] = True
    q = quantize_model(model, QuantConfig(w_bits=4, a_bits=8))
    calibrate(q, [(images, mask)], progress=False)
    return q, (images, mask)


def test_detr_no_grad_forward_is_bit_identical_and_inference_mode_is_close():
    q, inputs = _tiny_detr()
    ref, fast = _both(q, inputs)
    assert torch.equal(ref["pred_logits"], fast["pred_logits"]) and torch.equal(ref["pred_boxes"], fast["pred_boxes"])
    with torch.no_grad():
        integer = set_inference_mode(q)(inputs)
    # Float32 rounding of the fake-quant convolutions can flip an activation code at a rounding
    # tie, which later layers carry on: the outputs stay within a small fraction of their range.
    for key in ("pred_logits", "pred_boxes"):
        err = (integer[key] - ref[key]).abs()
        assert err.max() <= 0.05 * ref[key].abs().max() and err.mean() <= 0.005 * ref[key].abs().max(), key


def test_fisher_collection_is_unchanged_by_inference_mode():
    """The collector needs per-sample gradients: inference mode must not take over its passes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.Flatten(),
                        nn.Linear(8 * 7 * 7, 5))
    q, x = quantize_model(net, QuantConfig(w_bits=4, a_bits=8)), torch.randn(3, 3, 16, 16)
    calibrate(q, [x], progress=False)
    sums = []
    for integer in (False, True):
        set_inference_mode(q, integer)
        with FisherCollector(q) as fc:
            q.zero_grad(set_to_none=True)
            fc.backward(q(x).square().sum(1))
        sums.append(fc.sums)
    assert sums[0].keys() == sums[1].keys() and all(s.abs().sum() > 0 for s in sums[0].values())
    assert all(torch.equal(sums[0][k], sums[1][k]) for k in sums[0])


def test_reductions_too_long_for_int32_take_the_float_path(monkeypatch):
    from fqdetr.quant import inference

    monkeypatch.setattr(inference, "_MAX_CONV_K", 3 * 3 * 3 - 1)
    monkeypatch.setattr(inference, "_packed_conv_weight", lambda *a: pytest.fail("int8 convolution used"))
    torch.manual_seed(0)
    conv = set_inference_mode(QuantConv2d.from_float(nn.Conv2d(3, 4, 3), LayerQuantConfig(a_bits=8)))
    x = torch.randn(2, 3, 7, 7)
    ref, fast = _both(_calibrated(conv, x), x)
    assert torch.equal(ref, fast)
