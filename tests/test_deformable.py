"""Deformable DETR: the deformable attention core, the model's official names and
shapes, checkpoint recognition, the focal criterion and top-k post-processing."""
import argparse
import math

import pytest
import torch

from fqdetr.models import (DEFORMABLE_PRESETS, DETR, DeformableDETR, FocalHungarianMatcher, MSDeformAttn, TopKPostProcess,
                           build_deformable_criterion, build_deformable_detr, build_detr, checkpoint_family,
                           infer_deformable_config, load_detr_checkpoint, ms_deform_attn_sample, save_detr_checkpoint,
                           sigmoid_focal_loss, weighted_loss)
from fqdetr.io import atomic_torch_save

ODD_SHAPES = [(5, 7), (3, 2), (1, 1)]


def _bilinear_loop(value, shapes, locations, weights):
    """Direct reading of the definition: for every sample, the four neighbouring pixels
    (align_corners=False: pixel j covers [j, j+1) / W), zero outside the map."""
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = locations.shape
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(n_points):
                        x = locations[b, q, head, lvl, p, 0].item() * w - 0.5
                        y = locations[b, q, head, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= xi < w and 0 <= yi < h:
                                coef = (1 - abs(x - xi)) * (1 - abs(y - yi)) * weights[b, q, head, lvl, p].item()
                                out[b, q, head] += coef * value[b, starts[lvl] + yi * w + xi, head]
    return out.flatten(2)


def _attention_inputs(n=2, lq=3, m=2, d=3, points=2, shapes=ODD_SHAPES, low=-0.3, high=1.3,
                      dtype=torch.float64):
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, dtype=dtype)
    locations = torch.rand(n, lq, m, len(shapes), points, 2, dtype=dtype) * (high - low) + low
    weights = torch.rand(n, lq, m, len(shapes), points, dtype=dtype)
    return value, locations, weights


def test_deform_attn_matches_bilinear_loop_on_odd_shapes_including_outside_points():
    value, locations, weights = _attention_inputs()
    assert ((locations < 0) | (locations > 1)).any()  # some samples fall (partly) outside
    got = ms_deform_attn_sample(value, ODD_SHAPES, locations, weights)
    assert got.shape == (2, 3, 2 * 3)
    torch.testing.assert_close(got, _bilinear_loop(value, ODD_SHAPES, locations, weights))


def test_points_outside_the_map_read_zeros():
    shapes = [(1, 2)]
    value = torch.tensor([[[[3.0]], [[5.0]]]])  # [N=1, S=2, M=1, D=1]: pixels 3 and 5
    weights = torch.ones(1, 4, 1, 1, 1)
    # far outside (left, right, above); on the left edge: half of pixel 0, half of nothing
    xy = torch.tensor([[-0.6, 0.5], [1.6, 0.5], [0.25, -1.5], [0.0, 0.5]])
    out = ms_deform_attn_sample(value, shapes, xy.view(1, 4, 1, 1, 1, 2), weights)
    torch.testing.assert_close(out.view(4), torch.tensor([0.0, 0.0, 0.0, 1.5]))


def test_deform_attn_gradcheck_and_gradgradcheck_float64():
    value, locations, weights = _attention_inputs(n=1, lq=2, m=1, d=2, points=2, shapes=[(3, 2), (1, 3)],
                                                  low=0.05, high=0.95)
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))

    def fn(v, loc, w):
        return ms_deform_attn_sample(v, [(3, 2), (1, 3)], loc, w)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_deform_attn_rejects_shapes_that_do_not_cover_the_input():
    value, locations, weights = _attention_inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn_sample(value, [(5, 7), (3, 2)], locations, weights)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=1)
    with pytest.raises(ValueError, match="levels"):
        attn(torch.randn(1, 2, 8), torch.rand(1, 2, 2, 2), torch.randn(1, 5, 8), [(1, 5)])
    with pytest.raises(ValueError, match="end in 2"):
        attn(torch.randn(1, 2, 8), torch.rand(1, 2, 2, 3), torch.randn(1, 6, 8), [(1, 5), (1, 1)])


def test_msdeformattn_init_and_padding_mask():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=8, n_points=3)
    offsets = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    # head 0 points along +x, head 2 along +y, head 1 on the square's corner; point i at i+1
    torch.testing.assert_close(offsets[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(offsets[2, 0, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(offsets[1, 0, 0], torch.tensor([1.0, 1.0]))
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()
    # values under the padding mask never reach the output
    shapes = [(2, 3), (1, 2)]
    query, ref = torch.randn(2, 4, 16), torch.rand(2, 4, 2, 2)
    src, mask = torch.randn(2, 8, 16), torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 2] = mask[:, 7] = True
    changed = src.clone()
    changed[:, 2] += 10.0
    changed[:, 7] -= 10.0
    torch.testing.assert_close(attn(query, ref, src, shapes, mask), attn(query, ref, changed, shapes, mask))
    assert not torch.allclose(attn(query, ref, src, shapes), attn(query, ref, changed, shapes))


OFFICIAL_SHAPES = {
    "transformer.encoder.layers.0.self_attn.sampling_offsets.weight": (256, 256),
    "transformer.encoder.layers.0.self_attn.attention_weights.weight": (128, 256),
    "transformer.encoder.layers.0.self_attn.value_proj.weight": (256, 256),
    "transformer.encoder.layers.0.self_attn.output_proj.weight": (256, 256),
    "transformer.level_embed": (4, 256),
    "transformer.reference_points.weight": (2, 256),
    "query_embed.weight": (300, 512),
    "input_proj.3.0.weight": (256, 2048, 3, 3),
    "input_proj.3.1.weight": (256,),  # GroupNorm
    "class_embed.0.weight": (91, 256),
    "class_embed.5.weight": (91, 256),
    "transformer.decoder.layers.0.self_attn.in_proj_weight": (768, 256),
    "transformer.decoder.layers.5.cross_attn.sampling_offsets.weight": (256, 256),
    "backbone.0.body.layer4.2.conv3.weight": (2048, 512, 1, 1),
}


def _official_namespace(**changes):
    """The argparse args an official checkpoint carries (a subset; no num_classes etc.)."""
    args = dict(hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=1024, dropout=0.1,
                num_queries=300, num_feature_levels=4, enc_n_points=4, dec_n_points=4,
                position_embedding="sine", dilation=False, backbone="resnet50")
    return argparse.Namespace(**{**args, **changes})


def test_r50_official_names_shapes_parameter_count_and_inferred_config():
    model = build_deformable_detr("deformable_r50")
    sd = model.state_dict()
    for name, shape in OFFICIAL_SHAPES.items():
        assert tuple(sd[name].shape) == shape, name
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(40.1e6, abs=0.1e6)
    # what the loader rebuilds from a file with this layout and the official args
    config = infer_deformable_config(sd, _official_namespace())
    preset = DEFORMABLE_PRESETS["deformable_r50"]
    assert config.pop("num_classes") == 91
    assert config == {k: preset[k] for k in config}
    assert {"with_box_refine", "two_stage", "num_queries", "num_feature_levels", "enc_layers"} <= set(config)


def test_r50_box_refine_and_two_stage_have_the_official_extra_heads():
    refine = build_deformable_detr("deformable_r50_box_refine")
    assert sum(p.numel() for p in refine.parameters()) == pytest.approx(40.8e6, abs=0.1e6)
    sd = refine.state_dict()
    assert "transformer.decoder.bbox_embed.5.layers.2.weight" in sd
    assert refine.bbox_embed[0] is not refine.bbox_embed[1]  # refinement: one head per layer
    two = build_deformable_detr("deformable_r50_two_stage")
    sd = two.state_dict()
    assert "query_embed.weight" not in sd and "transformer.reference_points.weight" not in sd
    assert tuple(sd["transformer.pos_trans.weight"].shape) == (512, 512)
    assert "class_embed.6.weight" in sd and "transformer.decoder.class_embed.6.weight" in sd


def _tiny(**overrides):
    return build_deformable_detr("deformable_tiny", num_classes=5, **overrides)


@pytest.mark.parametrize("variant", [{}, {"with_box_refine": True}, {"with_box_refine": True, "two_stage": True}])
def test_tiny_forward_shapes_and_double_backward(variant):
    model = _tiny(**variant)
    images = [torch.rand(3, 64, 72), torch.rand(3, 48, 64)]
    out = model(images)
    assert out["pred_logits"].shape == (2, 20, 5) and out["pred_boxes"].shape == (2, 20, 4)
    assert len(out["aux_outputs"]) == 1
    assert ("enc_outputs" in out) == bool(variant.get("two_stage"))
    assert bool(((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all())
    criterion = build_deformable_criterion(5, dec_layers=2, two_stage=bool(variant.get("two_stage")))
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.1, 0.1]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.4, 0.5, 0.5]])}]
    loss = weighted_loss(criterion(out, targets), criterion.weight_dict)
    # the regulariser differentiates a gradient: deformable sampling must support it
    offsets = model.transformer.decoder.layers[-1].cross_attn.sampling_offsets.weight
    (grad,) = torch.autograd.grad(loss, offsets, create_graph=True)
    grad.pow(2).sum().backward()
    assert offsets.grad is not None and bool(torch.isfinite(offsets.grad).all()) and offsets.grad.any()


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match="num_feature_levels=2"):
        _tiny(num_feature_levels=2)
    with pytest.raises(ValueError, match="two_stage requires with_box_refine"):
        _tiny(two_stage=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        _tiny(hidden_dim=48, nheads=4)
    with pytest.raises(ValueError, match="unknown Deformable DETR preset"):
        build_deformable_detr("deformable_r51")
    two = _tiny(with_box_refine=True, two_stage=True, num_queries=200)
    with pytest.raises(ValueError, match="memory positions"):
        two(torch.rand(1, 3, 64, 64))


def test_single_level_model_reads_layer4_only():
    model = _tiny(num_feature_levels=1)
    assert len(model.input_proj) == 1 and model.input_proj[0][0].in_channels == 128
    assert model(torch.rand(1, 3, 64, 64))["pred_logits"].shape == (1, 20, 5)


def test_own_checkpoint_roundtrip_and_family_recognition(tmp_path):
    model = _tiny(with_box_refine=True, two_stage=True).eval()
    path = tmp_path / "deformable.pth"
    save_detr_checkpoint(model, path)
    loaded = load_detr_checkpoint(path).eval()
    assert isinstance(loaded, DeformableDETR) and loaded.two_stage and loaded.config == model.config
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["pred_boxes"], model(x)["pred_boxes"])
    assert checkpoint_family(model.state_dict()) == "deformable_detr"
    detr = build_detr("tiny", num_classes=5)
    assert checkpoint_family(detr.state_dict()) == "detr"
    detr_path = tmp_path / "detr.pth"
    save_detr_checkpoint(detr, detr_path)
    assert isinstance(load_detr_checkpoint(detr_path), DETR)
    with pytest.raises(ValueError, match="holds a deformable_detr, the model given is a detr"):
        load_detr_checkpoint(path, model=detr)


def _official_tiny_file(tmp_path, sd, **args):
    path = tmp_path / "official.pth"
    namespace = _official_namespace(**{"hidden_dim": 64, "nheads": 4, "dim_feedforward": 128, "num_queries": 20,
                                       "enc_layers": 2, "dec_layers": 2, "backbone": "resnet18", **args})
    atomic_torch_save({"model": sd, "args": namespace}, path)
    return path


def test_official_layout_infers_variant_and_rejects_mismatched_levels(tmp_path):
    sd = _tiny(with_box_refine=True).state_dict()
    loaded = load_detr_checkpoint(_official_tiny_file(tmp_path, sd))
    assert isinstance(loaded, DeformableDETR) and loaded.with_box_refine and not loaded.two_stage
    assert (loaded.num_classes, loaded.num_queries, loaded.num_feature_levels) == (5, 20, 4)
    five_levels = dict(sd, **{"transformer.level_embed": torch.zeros(5, 64)})
    with pytest.raises(ValueError, match="5 feature levels .* but 4 input projections"):
        load_detr_checkpoint(_official_tiny_file(tmp_path, five_levels))
    wrong_channels = dict(sd, **{"input_proj.0.0.weight": torch.zeros(64, 48, 1, 1)})
    with pytest.raises(ValueError, match="do not match its backbone resnet18"):
        load_detr_checkpoint(_official_tiny_file(tmp_path, wrong_channels))
    with pytest.raises(ValueError, match="give the checkpoint's nheads"):
        load_detr_checkpoint(_official_tiny_file(tmp_path, sd, enc_n_points=3))


def test_unknown_architecture_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    atomic_torch_save({"model": {"encoder.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ValueError, match="unknown architecture"):
        load_detr_checkpoint(path)
