"""Packed integer checkpoints: dense bit packing, bit-exact round trip, clear errors."""
import json
import os

import pytest
import torch

from fqdetr.export import load_packed, save_packed
from fqdetr.export.bitpack import pack_codes, packed_nbytes, unpack_codes
from fqdetr.engine.quantize import apply_allocation, quantize_detr
from fqdetr.models import DeformableDETR, build_deformable_detr, build_detr, save_detr_checkpoint
from fqdetr.quant import QuantConfig, calibrate, quantize_model
from fqkernels import reference

# Mixed bit-widths: 3- and 5-bit rows straddle bytes, 2-bit packs four to a byte.
ALLOCATION = {"transformer.encoder.layers.0.linear1": 3, "transformer.decoder.layers.0.self_attn": 2,
              "transformer.decoder.layers.0.self_attn.out_proj": 5, "transformer.encoder.layers.1.linear2": 6}


def _inputs():
    images = torch.randn(2, 3, 64, 80)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 56:] = True  # the second image is padded on the right
    return images, mask


def _quantized(model, allocation=None):
    """W4A8 (Deformable DETR: everywhere; DETR: the 8-bit first conv and heads of docs/METHOD.md section 5.4, then
    ``allocation``), calibrated on one batch."""
    torch.manual_seed(0)
    if isinstance(model, DeformableDETR):
        qmodel = quantize_model(model.eval(), QuantConfig(w_bits=4))
    else:
        qmodel = quantize_detr(model.eval(), allocation=allocation, w_bits=4)
    calibrate(qmodel, [_inputs()], progress=False)
    return qmodel.eval()


@pytest.fixture(scope="module")
def detr_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    torch.manual_seed(0)
    model = build_detr("tiny", num_classes=16)
    save_detr_checkpoint(model, root / "float.pth")
    qmodel = _quantized(model, ALLOCATION)
    save_packed(qmodel, root / "model.fqp", metadata={"image_size": 64})
    return qmodel, root


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("count", [1, 2, 7, 8, 29])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_round_trip_at_every_bit_width(bits, count, signed):
    qmin, qmax = reference.qrange(bits, signed)
    codes = torch.randint(qmin, qmax + 1, (count,))
    codes[0] = qmin  # both ends of the range: qmax is the all-ones field a masking bug would cut
    codes[-1] = qmax if count > 1 else codes[-1]
    for one_end in ([qmin], [qmax]):  # a single code, alone in its byte
        assert unpack_codes(pack_codes(torch.tensor(one_end), bits, signed), 1, bits, signed).tolist() == one_end
    packed = pack_codes(codes, bits, signed)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack_codes(packed, count, bits, signed), codes.int())


def test_two_4bit_codes_per_byte_low_nibble_first():
    packed = pack_codes(torch.tensor([-8, 7, 0, -1]), 4)
    # fields are code - qmin = code + 8
    assert packed.tolist() == [0 | (15 << 4), 8 | (7 << 4)]


def test_codes_outside_the_bit_width_are_refused():
    with pytest.raises(ValueError, match=r"codes: expected values in \[-4, 3\] for 3-bit codes"):
        pack_codes(torch.tensor([0, 4]), 3)
    with pytest.raises(ValueError, match="do not fit their bit-width"):
        unpack_codes(pack_codes(torch.zeros(10, dtype=torch.int32), 4), 10, 3)
    with pytest.raises(ValueError, match="bits set past the last 3-bit code"):
        unpack_codes(torch.tensor([0, 0xFF], dtype=torch.uint8), 5, 3)


def test_detr_round_trip_is_bit_exact_and_smaller(detr_files):
    qmodel, root = detr_files
    loaded, metadata = load_packed(root / "model.fqp", with_metadata=True)
    assert metadata == {"image_size": 64} and not loaded.training
    images, mask = _inputs()
    expected, got = qmodel((images, mask)), loaded((images, mask))
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(got[key], expected[key]), key
    layer = loaded.transformer.decoder.layers[0].self_attn
    assert layer.weight_quantizer.bits == 2 and layer.out_proj.weight_quantizer.bits == 5
    # the loaded weights are exactly their codes times their scales
    wq = layer.weight_quantizer
    codes = layer.in_proj_weight / wq.scale[:, None]
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 2
    # mostly 4-bit weights against float32: well under a quarter of the float file
    assert os.path.getsize(root / "model.fqp") < 0.3 * os.path.getsize(root / "float.pth")


def test_deformable_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    qmodel = _quantized(build_deformable_detr("deformable_tiny", num_classes=5))
    save_packed(qmodel, tmp_path / "deformable.fqp")
    loaded = load_packed(tmp_path / "deformable.fqp")
    assert loaded.class_embed[0] is loaded.class_embed[1]  # one shared head, as quantize_model made it
    images, mask = _inputs()
    expected, got = qmodel((images, mask)), loaded((images, mask))
    assert torch.equal(got["pred_logits"], expected["pred_logits"])
    assert torch.equal(got["pred_boxes"], expected["pred_boxes"])


def test_box_refinement_heads_are_stored_once_as_codes(tmp_path):
    """With box refinement the decoder holds the head's box layers under a second name: the
    packed file stores their codes once, no float copy under the other name, and loads them
    shared again."""
    torch.manual_seed(0)
    model = build_deformable_detr("deformable_tiny", num_classes=5, with_box_refine=True)
    for head in model.bbox_embed:  # the preset zero-initialises the last layer: refinement would do nothing
        torch.nn.init.normal_(head.layers[-1].weight, std=0.05)
    qmodel = _quantized(model)
    save_packed(qmodel, tmp_path / "refine.fqp")
    state = torch.load(tmp_path / "refine.fqp", weights_only=True)["state"]
    assert not [k for k in state if "bbox_embed" in k and k.endswith(".weight")]  # codes only
    loaded = load_packed(tmp_path / "refine.fqp")
    assert loaded.bbox_embed[1] is loaded.transformer.decoder.bbox_embed[1]
    images, mask = _inputs()
    expected, got = qmodel((images, mask)), loaded((images, mask))
    assert torch.equal(got["pred_logits"], expected["pred_logits"])
    assert torch.equal(got["pred_boxes"], expected["pred_boxes"])


def test_float_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model: expected a quantized model"):
        save_packed(build_detr("tiny", num_classes=3), tmp_path / "x.fqp")
    assert not (tmp_path / "x.fqp").exists()


def test_corrupt_or_foreign_files_error_clearly(detr_files, tmp_path):
    _, root = detr_files
    truncated = tmp_path / "truncated.fqp"
    truncated.write_bytes((root / "model.fqp").read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.fqp: not a readable packed checkpoint"):
        load_packed(truncated)
    with pytest.raises(ValueError, match="float.pth: not a readable packed checkpoint"):
        load_packed(root / "float.pth")


def _rewritten(root, tmp_path, edit):
    """The packed file with ``edit(header, codes)`` applied, saved under tmp_path."""
    payload = torch.load(root / "model.fqp", weights_only=True)
    header = json.loads(payload["header"])
    edit(header, payload["codes"])
    payload["header"] = json.dumps(header)
    torch.save(payload, tmp_path / "edited.fqp")
    return tmp_path / "edited.fqp"


def test_codes_that_do_not_fit_their_bit_width_error_with_the_weight(detr_files, tmp_path):
    _, root = detr_files
    key = "transformer.encoder.layers.0.linear1.weight"

    def claim_two_bits(header, codes):
        header["weights"][key]["bits"] = 2  # packed at 3 bits

    with pytest.raises(ValueError, match=f"weight {key} .*do not fit their bit-width"):
        load_packed(_rewritten(root, tmp_path, claim_two_bits))

    def drop_codes(header, codes):
        del codes[key]

    with pytest.raises(ValueError, match="packed codes and header disagree"):
        load_packed(_rewritten(root, tmp_path, drop_codes))

    def drop_float_layers(header, codes):
        del header["float_layers"]

    with pytest.raises(ValueError, match=r"edited.fqp: header lacks float_layers \(list\)"):
        load_packed(_rewritten(root, tmp_path, drop_float_layers))
