"""Bad input, each a clear error naming the argument (or file) and what was expected, never a
crash, hang or silent wrong number: kernels (bits, dtypes, devices, shapes, non-contiguous,
NaN/Inf in inputs and scales), configs, data and checkpoints. What tests/test_data.py,
tests/test_models.py, tests/test_quant_modules.py and the kernel tests already check is not
repeated here.

Documented behaviour of NaN/Inf (README, "Quantization conventions"):
  inputs  NaN stays NaN (and poisons the sums it enters: scale gradients, GEMM rows, Fisher);
          +-inf saturates to qmax*s / qmin*s like any out-of-range value, its STE gradient is 0
          and its LSQ scale-gradient term is qmax/qmin (finite);
  scales  must be finite and positive: NaN, inf, 0 or negative raise ValueError naming the scale.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fqkernels as fk
from fqkernels import reference
from fqdetr.data import CocoDetection
from fqdetr.engine.checkpoint import load_training_checkpoint, save_training_checkpoint
from fqdetr.engine.quantize import apply_allocation
from fqdetr.fisher import FisherCollector
from fqdetr.models.checkpoint import read_checkpoint
from fqdetr.quant import QuantConfig, quantize_model

BACKENDS = [b for b in ("reference", "cpu") if b in fk.available_backends()]
NAN, INF = float("nan"), float("inf")


def _ql(x, w, backend="reference", **kw):
    args = dict(bias=None, w_scale=0.1, a_scale=0.1, w_bits=4, a_bits=8)
    args.update(kw)
    return fk.quant_linear(x, w, backend=backend, **args)


# ------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("bits, error", [(0, ValueError), (1, ValueError), (9, ValueError), (-4, ValueError),
                                         (4.0, TypeError), (True, TypeError), ("4", TypeError), (None, TypeError)])
def test_bits_are_checked_by_every_op(bits, error):
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    calls = {
        "bits": lambda: fk.fake_quant(x, 0.1, bits=bits),
        "w_bits": lambda: _ql(x, w, w_bits=bits),
        "a_bits": lambda: _ql(x, w, a_bits=bits),
        "b_bits": lambda: fk.quant_matmul(a, b, 0.1, 0.1, b_bits=bits),
    }
    if bits is None:
        del calls["a_bits"]  # a_bits=None is weight-only quantization (next test)
    for name, call in calls.items():
        with pytest.raises(error, match=name):
            call()


def test_a_bits_none_means_weight_only():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    y = _ql(x, w, a_bits=None, a_scale=None)
    torch.testing.assert_close(y, x @ reference.fake_quant_forward(w, torch.full((5,), 0.1), 4, True, 0).t())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.float64, torch.bool, torch.complex64])
def test_unsupported_dtypes_name_the_argument(dtype):
    good = torch.randn(3, 8)
    bad = torch.ones(3, 8, dtype=dtype)
    with pytest.raises(TypeError, match="x: expected dtype"):
        fk.fake_quant(bad, 0.1)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        _ql(good, torch.ones(5, 8, dtype=dtype))
    with pytest.raises(TypeError, match="grad_out: expected dtype"):
        fk.per_sample_fisher(good, bad)
    with pytest.raises(TypeError, match="a: expected dtype"):
        fk.quant_matmul(bad[None], good.t()[None], 0.1, 0.1)
    if dtype != torch.float64:
        with pytest.raises(TypeError, match="scale"):
            fk.fake_quant(good, torch.ones(1, dtype=dtype))
    with pytest.raises(TypeError, match="dtype: expected torch.float32 or torch.float64"):
        fk.per_sample_fisher(good, good, dtype=torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_runs_on_every_backend_like_the_reference(backend):
    """float16 passes the checks, so every backend must run it (the C++ kernel has no float16
    path: the cpu backend computes in float32 and rounds back, exactly like the reference)."""
    x = (torch.randn(7, 33) * 3).half().requires_grad_()
    s = (torch.rand(33) + 0.05).requires_grad_()
    y = fk.fake_quant(x, s, 3, False, axis=1, backend=backend)
    assert y.dtype == torch.float16
    assert torch.equal(y, reference.fake_quant_forward(x.detach(), s.detach(), 3, False, axis=1))
    g = torch.randn(7, 33).half()
    y.backward(g)
    gx, gs = reference.fake_quant_backward(g, x.detach(), s.detach(), 3, False, axis=1)
    assert torch.equal(x.grad, gx)
    # 7 float32 terms per channel summed in another order: a few ulps of the magnitude sum.
    torch.testing.assert_close(s.grad, gs, rtol=1e-5, atol=1e-5 * g.float().abs().sum(0).max().item() * 7)


def test_devices_must_match_and_backends_refuse_foreign_devices():
    """Tensors on another device (meta stands in for a GPU here) are named in a ValueError."""
    cpu, meta = torch.randn(4, 8), torch.randn(4, 8, device="meta")
    w_meta = torch.randn(3, 8, device="meta")
    with pytest.raises(ValueError, match="scale: expected a tensor on the input's device cpu, got meta"):
        fk.fake_quant(cpu, torch.ones(1, device="meta"))
    with pytest.raises(ValueError, match="weight: expected a tensor on x's device cpu, got meta"):
        _ql(cpu, w_meta)
    with pytest.raises(ValueError, match="bias: expected a tensor on x's device"):
        _ql(cpu, torch.randn(3, 8), bias=torch.randn(3, device="meta"))
    with pytest.raises(ValueError, match="fisher: expected a tensor on x's device"):
        _ql(cpu, torch.randn(3, 8), fisher=torch.zeros(3, 8, device="meta"))
    with pytest.raises(ValueError, match="grad_out: expected a tensor on x's device"):
        fk.per_sample_fisher(cpu, meta)
    with pytest.raises(ValueError, match="b: expected a tensor on a's device"):
        fk.quant_matmul(cpu[None], meta.t()[None], 0.1, 0.1)
    if "cpu" in BACKENDS:
        for call in (lambda: fk.fake_quant(meta, 0.1, backend="cpu"),
                     lambda: _ql(meta, w_meta, backend="cpu"),
                     lambda: fk.per_sample_fisher(meta, meta, backend="cpu")):
            with pytest.raises(ValueError, match="backend 'cpu' cannot run .* on meta tensors"):
                call()
    with pytest.raises(ValueError, match="backend: expected one of"):
        fk.fake_quant(cpu, 0.1, backend="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cuda' .* unavailable"):
            fk.fake_quant(cpu, 0.1, backend="cuda")
    # Without a forced backend, a device no compiled backend serves falls back to the reference.
    assert fk.backend_for("fake_quant", meta) == "reference"
    assert fk.fake_quant(meta, 0.1).shape == meta.shape


@pytest.mark.parametrize("call, match", [
    (lambda: fk.fake_quant(torch.randn(4, 8), torch.rand(3) + 0.1, axis=1), r"scale: expected 8 element\(s\)"),
    (lambda: fk.fake_quant(torch.randn(4, 8), torch.rand(2) + 0.1), r"scale: expected 1 element\(s\)"),
    (lambda: fk.fake_quant(torch.randn(4, 8), 0.1, axis=2), "axis: expected a dimension"),
    (lambda: fk.fake_quant(torch.randn(4, 8), 0.1, axis=1.0), "axis: expected None or an int"),
    (lambda: _ql(torch.randn(4, 7), torch.randn(3, 8)), "x: expected last dimension 8"),
    (lambda: _ql(torch.tensor(1.0), torch.randn(3, 8)), "x: expected"),
    (lambda: _ql(torch.randn(4, 8), torch.randn(3, 8, 1)), "weight: expected 2 dimensions"),
    (lambda: _ql(torch.randn(4, 8), torch.randn(3, 8), w_scale=torch.rand(2) + 0.1), r"w_scale: expected 3"),
    (lambda: _ql(torch.randn(4, 8), torch.randn(3, 8), a_scale=torch.rand(2) + 0.1), r"a_scale: expected 1"),
    (lambda: _ql(torch.randn(4, 8), torch.randn(3, 8), bias=torch.randn(4)), r"bias: expected shape \[3\]"),
    (lambda: _ql(torch.randn(4, 8), torch.randn(3, 8), fisher=torch.zeros(8, 3)), r"fisher: expected shape \[3, 8\]"),
    (lambda: _ql(torch.randn(2, 4, 8), torch.randn(3, 8), fisher=torch.zeros(3, 8), fisher_batch_dim=2),
     "fisher_batch_dim"),
    (lambda: fk.per_sample_fisher(torch.randn(2, 3, 4), torch.randn(2, 4, 5)), "grad_out: expected leading dims"),
    (lambda: fk.per_sample_fisher(torch.randn(2, 3, 4, 1), torch.randn(2, 3, 4, 1)), "x: expected"),
    (lambda: fk.per_sample_fisher(torch.randn(2, 4), torch.randn(2, 5), batch_dim=1), "batch_dim"),
    (lambda: fk.per_sample_fisher(torch.randn(2, 4), torch.randn(2, 5), out=torch.zeros(4, 5)), r"out: expected shape"),
    (lambda: fk.per_sample_fisher(torch.randn(2, 4), torch.randn(2, 5), out=torch.zeros(4, 5).t()),
     "out: expected a contiguous tensor"),
    (lambda: fk.quant_matmul(torch.randn(2, 3, 4), torch.randn(2, 5, 5), 0.1, 0.1), "b: expected 4 rows"),
])
def test_shape_errors_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_are_accepted(backend):
    """Transposed, sliced and expanded views give the same numbers as contiguous copies."""
    base = torch.randn(33, 14) * 2
    x = base.t()[:, ::2]  # [14, 17], strides (1, 28)
    assert not x.is_contiguous()
    s = torch.rand(17) + 0.05
    assert torch.equal(fk.fake_quant(x, s, 4, axis=1, backend=backend),
                       fk.fake_quant(x.contiguous(), s, 4, axis=1, backend=backend))
    w = torch.randn(17, 9).t()  # [9, 17]
    w_scale = torch.rand(18)[::2] + 0.05  # a strided per-channel scale
    a_scale = torch.full((1,), 0.05)
    bias = torch.randn(18)[::2]
    y = _ql(x, w, backend, w_scale=w_scale, a_scale=a_scale, bias=bias)
    y_ref = _ql(x.contiguous(), w.contiguous(), backend, w_scale=w_scale.contiguous(), a_scale=a_scale,
                bias=bias.contiguous())
    # The compiled backend copies its operands to contiguous float32 first: bit-identical. The
    # reference hands the views to torch's GEMM, which may pick another kernel for transposed
    # operands: the same 17 (or 14) products summed in another order, within 1e-5 relative.
    close = torch.equal if backend != "reference" else \
        (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item()))
    assert close(y, y_ref)
    d = torch.randn(9, 14).t()  # [14, 9]
    assert close(fk.per_sample_fisher(x, d, backend=backend),
                 fk.per_sample_fisher(x.contiguous(), d.contiguous(), backend=backend))
    e = torch.randn(1, 17).expand(14, 17)  # stride 0 along the samples
    torch.testing.assert_close(fk.per_sample_fisher(e, d, backend=backend),
                               fk.per_sample_fisher(e.contiguous(), d.contiguous(), backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed", [True, False])
def test_nan_propagates_and_inf_saturates_in_fake_quant(backend, signed):
    bits, s = 4, 0.25
    qmin, qmax = reference.qrange(bits, signed)
    x = torch.tensor([0.3, NAN, INF, -INF, -0.6, 9.0]).requires_grad_()
    scale = torch.tensor([s], requires_grad=True)
    y = fk.fake_quant(x, scale, bits, signed, backend=backend)
    assert torch.isnan(y[1]) and torch.isfinite(y[[0, 2, 3, 4, 5]]).all()
    assert y[2].item() == qmax * s and y[3].item() == qmin * s  # inf saturates like 9.0
    assert y[5].item() == qmax * s
    y.backward(torch.ones(6))
    # No straight-through gradient for NaN or out-of-range (inf) elements.
    assert x.grad[1:4].tolist() == [0.0, 0.0, 0.0]
    assert torch.isnan(scale.grad).all()  # NaN propagates into the scale gradient
    # Without the NaN, inf only adds its saturated qmax/qmin term: finite.
    x2 = x.detach()[[0, 2, 3, 4, 5]].clone().requires_grad_()
    scale2 = torch.tensor([s], requires_grad=True)
    fk.fake_quant(x2, scale2, bits, signed, backend=backend).sum().backward()
    assert torch.isfinite(scale2.grad).all()
    _, expected = reference.fake_quant_backward(torch.ones(5), x2.detach(), scale2.detach(), bits, signed)
    torch.testing.assert_close(scale2.grad, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_in_quant_linear_inputs(backend):
    x = torch.randn(5, 8)
    w = torch.randn(3, 8)
    w_scale, a_scale = torch.rand(3) * 0.2 + 0.05, torch.tensor([0.1])
    x_bad = x.clone()
    x_bad[1, 2] = NAN
    x_bad[3, 0], x_bad[3, 5] = INF, -INF
    y = _ql(x_bad, w, backend, w_scale=w_scale, a_scale=a_scale)
    assert torch.isnan(y[1]).all()  # the NaN row only
    assert torch.isfinite(y[[0, 2, 3, 4]]).all()
    # +-inf act like any value beyond the range: the same as +-1e30
    x_big = x_bad.clone()
    x_big[3, 0], x_big[3, 5] = 1e30, -1e30
    y_big = _ql(x_big, w, backend, w_scale=w_scale, a_scale=a_scale)
    assert torch.equal(y[3], y_big[3])
    ref = _ql(x_bad, w, "reference", w_scale=w_scale, a_scale=a_scale)
    assert torch.equal(y.isnan(), ref.isnan())
    torch.testing.assert_close(y[[0, 2, 3, 4]], ref[[0, 2, 3, 4]], rtol=1e-5, atol=1e-5)  # GEMM orders differ
    # NaN weights: the NaN weight's output column only
    w_bad = w.clone()
    w_bad[2, 4] = NAN
    y = _ql(x, w_bad, backend, w_scale=w_scale, a_scale=a_scale)
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_in_per_sample_fisher(backend):
    x, d = torch.randn(4, 3, 5), torch.randn(4, 3, 2)
    x[2, 1, 3] = NAN
    f = fk.per_sample_fisher(x, d, backend=backend)
    assert torch.isnan(f[:, 3]).all() and torch.isfinite(f[:, [0, 1, 2, 4]]).all()
    sq = fk.per_sample_sq_norms(x, d, backend=backend)
    assert torch.isnan(sq[2]) and torch.isfinite(sq[[0, 1, 3]]).all()


@pytest.mark.parametrize("value", [NAN, INF, -INF, 0.0, -0.1])
def test_bad_scales_raise_value_error(value):
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    per_channel = torch.full((8,), 0.1)
    per_channel[5] = value
    with pytest.raises(ValueError, match="scale: expected a finite positive"):
        fk.fake_quant(x, value)
    with pytest.raises(ValueError, match="scale: expected finite positive values"):
        fk.fake_quant(x, per_channel, axis=1)
    with pytest.raises(ValueError, match="w_scale"):
        _ql(x, w, w_scale=torch.tensor([0.1, value, 0.1]))
    with pytest.raises(ValueError, match="a_scale"):
        _ql(x, w, a_scale=torch.tensor([value]))
    with pytest.raises(ValueError, match="b_scale"):
        fk.quant_matmul(x[None], w.t()[None], 0.1, value)


# ------------------------------------------------------------------------------------ configs
def _small_quant_model():
    torch.manual_seed(0)
    return quantize_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), QuantConfig(w_bits=4))


@pytest.mark.parametrize("suffix, text, match", [
    (".json", "[1, 2]", "expected a mapping"),
    (".yaml", "- w_bits: 4\n", "expected a mapping"),
    (".yaml", "w_bits: 9\n", "w_bits: expected an int in 2..8, got 9"),
    (".json", '{"w_bits": "4"}', "w_bits: expected an int in 2..8, got '4'"),
    (".json", '{"layers": ["head"]}', "layers: expected a mapping"),
    (".json", '{"layers": {"head": 8}}', r"layers\['head'\]: expected a dict"),
    (".json", '{"skip": "class_embed"}', "skip: expected a list"),
    (".json", '{"calibration": "minmax"}', "calibration"),
    (".yaml", "w_bits: [4,\n", "not a valid YAML"),
    (".json", "", "not a valid JSON"),
])
def test_bad_quant_config_files_name_the_file(tmp_path, suffix, text, match):
    path = tmp_path / f"quant{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        QuantConfig.load(path)
    assert str(path) in str(err.value)


def test_quant_config_binary_and_missing_files(tmp_path):
    path = tmp_path / "quant.json"
    path.write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(ValueError, match="quant.json: not a valid JSON .*UTF-8"):
        QuantConfig.load(path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        QuantConfig.load(tmp_path / "nope.yaml")


def test_yaml_configs_never_construct_python_objects(tmp_path):
    """Only yaml.safe_load reads configs: tags that would call Python refuse to load, with no
    side effect (the tag here would create a file)."""
    marker = tmp_path / "created_by_yaml"
    path = tmp_path / "evil.yaml"
    path.write_text(f"!!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(ValueError, match="evil.yaml"):
        QuantConfig.load(path)
    from fqdetr.cli._common import load_config_file

    with pytest.raises(ValueError, match="evil.yaml"):
        load_config_file(path)
    assert not marker.exists()


def test_unknown_layer_names_in_config_and_allocation():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"\['nope\*'\] match no") as err:
        quantize_model(model, QuantConfig(skip=["nope*"]))
    assert "'0'" in str(err.value)  # lists valid names
    qmodel = _small_quant_model()
    with pytest.raises(ValueError, match=r"allocation: unknown layers \['head'\]"):
        apply_allocation(qmodel, {"head": 4})
    with pytest.raises(ValueError, match=r"allocation\['2'\]: expected a bit-width in 2..8, got 12"):
        apply_allocation(qmodel, {"2": {"w_bits": 12}})
    with pytest.raises(TypeError, match=r"allocation\['0'\]"):
        apply_allocation(qmodel, {"0": "4"})
    with pytest.raises(ValueError, match="allocation: expected a mapping"):
        apply_allocation(qmodel, [("0", 4)])
    apply_allocation(qmodel, {"0": np.int64(3), "2": {"w_bits": 5, "a_bits": 8}})  # numpy ints are fine
    assert qmodel[0].weight_quantizer.bits == 3 and qmodel[2].weight_quantizer.bits == 5


def test_cli_json_options_name_option_and_file(tmp_path):
    from fqdetr.cli._common import read_json_option

    bad = tmp_path / "alloc.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="--allocation: cannot read .*alloc.json as JSON"):
        read_json_option(bad, "--allocation")
    bad.write_text("[1]")
    with pytest.raises(ValueError, match="--allocation: .*alloc.json must hold a JSON object"):
        read_json_option(bad, "--allocation")
    with pytest.raises(ValueError, match="--fisher: cannot read .*missing.json"):
        read_json_option(tmp_path / "missing.json", "--fisher")
    bad.write_text('{"a": 1}')
    assert read_json_option(bad, "--fisher") == {"a": 1}


# --------------------------------------------------------------------------------------- data
def _coco(tmp_path, images, annotations=()):
    data = {"images": [{"id": i + 1, "file_name": n} for i, n in enumerate(images)],
            "annotations": list(annotations), "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_more_image_modes_become_8_bit_rgb(tmp_path):
    folder = tmp_path / "im"
    folder.mkdir()
    Image.new("RGBA", (10, 8), (200, 100, 50, 0)).save(folder / "rgba.png")
    Image.new("CMYK", (10, 8), (0, 0, 0, 0)).save(folder / "cmyk.jpg")  # CMYK zeros: white
    Image.new("1", (10, 8), 1).save(folder / "bw.png")
    Image.new("LA", (10, 8), (90, 255)).save(folder / "la.png")
    # 16-bit grey: PIL's own conversion clips at 255 (almost everything white); scaled instead.
    Image.fromarray(np.full((8, 10), 40000, np.uint16)).save(folder / "grey16.png")
    Image.new("F", (10, 8), 0.5).save(folder / "float.tiff")
    names = ["rgba.png", "cmyk.jpg", "bw.png", "la.png", "grey16.png", "float.tiff"]
    ds = CocoDetection(folder, _coco(tmp_path, names))
    expected = [(200, 100, 50), (255, 255, 255), (255, 255, 255), (90, 90, 90), (156, 156, 156)]
    for i, rgb in enumerate(expected):
        img, _ = ds[i]
        assert img.shape == (3, 8, 10), names[i]
        torch.testing.assert_close(img[:, 0, 0], torch.tensor(rgb, dtype=torch.float32) / 255, msg=names[i])
    with pytest.raises(ValueError, match=r"float.tiff: floating-point image \(mode F\)"):
        ds[5]


def test_truncated_image_and_more_degenerate_boxes(tmp_path):
    folder = tmp_path / "im"
    folder.mkdir()
    Image.effect_noise((64, 48), 60).convert("RGB").save(folder / "ok.jpg")
    data = (folder / "ok.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    boxes = [[2, 2, -3, 4],       # negative width: dropped
             [70, 10, 5, 5],      # entirely right of the 64-pixel image: dropped after clipping
             [-9, -9, 4, 4],      # entirely above-left: dropped
             [10, 10, 0.0, 3],    # zero width: dropped
             [60, 40, 10, 10]]    # partly outside: clipped to [60, 40, 64, 48]
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b} for i, b in enumerate(boxes)]
    ds = CocoDetection(folder, _coco(tmp_path, ["ok.jpg", "cut.jpg"], anns))
    _, t = ds[0]
    torch.testing.assert_close(t["boxes"], torch.tensor([[62 / 64, 44 / 48, 4 / 64, 8 / 48]]))
    assert t["labels"].tolist() == [0]
    with pytest.raises(ValueError, match="cannot read image .*cut.jpg: image file is truncated"):
        ds[1]


@pytest.mark.parametrize("content, match", [
    (b"", "invalid JSON"),
    (b"\xff\xfe{", "invalid JSON"),
    (b'{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 1, "image_id": 1, '
     b'"category_id": 1, "bbox": [NaN, 1, 2, 3]}], "categories": [{"id": 1, "name": "a"}]}', "4 finite numbers"),
    (b'{"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}], "annotations": [], '
     b'"categories": []}', "duplicate image ids"),
])
def test_more_corrupt_annotation_files(tmp_path, content, match):
    (tmp_path / "im").mkdir()
    path = tmp_path / "ann.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        CocoDetection(tmp_path / "im", path)
    assert "ann.json" in str(err.value)


# -------------------------------------------------------------------------------- checkpoints
class _Evil:
    """Unpickling this would run code (create a file): weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_never_unpickle_code(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 0, "step": 0, "sums": _Evil(marker)}, path)
    with pytest.raises(ValueError, match="evil.pth"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="evil.pth"):
        load_training_checkpoint(path, nn.Linear(1, 1))
    with pytest.raises(ValueError, match="evil.pth"):
        FisherCollector.load(path)
    assert not marker.exists()


def test_training_checkpoint_errors(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    path = tmp_path / "train.pth"
    save_training_checkpoint(path, model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=1, step=5)
    with pytest.raises(ValueError, match="does not fit the model") as err:
        load_training_checkpoint(path, nn.Sequential(nn.Linear(3, 5)))
    assert "2.weight" in str(err.value) and "0.weight" in str(err.value)  # unexpected key, shape mismatch
    data = path.read_bytes()
    for name, content in (("truncated.pth", data[: len(data) // 2]), ("empty.pth", b""),
                          ("text.pth", b"not a checkpoint")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"cannot read checkpoint .*{name}"):
            load_training_checkpoint(tmp_path / name, model)
    torch.save({"model": model.state_dict()}, tmp_path / "model_only.pth")
    with pytest.raises(ValueError, match=r"not a training checkpoint \(lacks \['epoch', 'step'\]\)"):
        load_training_checkpoint(tmp_path / "model_only.pth", model)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_training_checkpoint(tmp_path / "absent.pth", model)


def test_fisher_state_errors(tmp_path):
    qmodel = _small_quant_model()
    x = torch.randn(3, 3)
    qmodel(x)
    with FisherCollector(qmodel) as fc:
        fc.backward(qmodel(x).square().sum(1))
    fc.save(tmp_path / "fisher.pt")
    data = (tmp_path / "fisher.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.pt: not a readable Fisher state"):
        FisherCollector.load(tmp_path / "cut.pt")
    torch.save({"model": qmodel.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt: not a Fisher state .*found \['model'\]"):
        FisherCollector.load(tmp_path / "other.pt")
    other_model = quantize_model(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)), QuantConfig())
    with pytest.raises(ValueError, match=r"merge: .*another model .*0: \[4, 3\] vs \[5, 3\]"):
        FisherCollector(other_model).merge(FisherCollector.load(tmp_path / "fisher.pt"))
    bigger = quantize_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2)),
                            QuantConfig())
    with pytest.raises(ValueError, match=r"missing \['3'\]"):
        FisherCollector(bigger).merge(FisherCollector.load(tmp_path / "fisher.pt"))


UNSAFE = (r"shell\s*=\s*True|os\.system\(|os\.popen\(|(?<![\w.])eval\(|(?<![\w.])exec\("  # not model.eval()
          r"|\bpickle\b|\bmarshal\b")


def test_no_unsafe_loaders_or_shell_in_the_sources():
    """Security: checkpoints only through torch.load(weights_only=True), configs through safe
    YAML loading, no shell execution, eval/exec or pickle in the package sources."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [p for d in ("fqdetr", "fqkernels") for p in (root / d).rglob("*.py")] + [root / "setup.py"]
    problems = []
    for path in files:
        text = path.read_text()
        for call in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):  # calls over several lines too
            if not re.search(r"weights_only\s*=\s*True", call.group(0)):
                problems.append(f"{path.name}: {call.group(0)} without weights_only=True")
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"yaml\.(load|unsafe_load|full_load|load_all)\(", code):
                problems.append(f"{path.name}:{i}: yaml loader other than safe_load")
            if re.search(UNSAFE, code):
                problems.append(f"{path.name}:{i}: {code.strip()}")
    assert len(files) > 20 and not problems, problems
