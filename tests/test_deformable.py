"""Deformable DETR: the deformable attention core, the model's official names and
shapes, checkpoint recognition, the focal criterion and top-k post-processing."""
import argparse
import math

import pytest
import torch

from fqdetr.io import atomic_torch_save
from fqdetr.models import (DEFORMABLE_PRESETS, DETR, DeformableDETR, FocalHungarianMatcher, MSDeformAttn,
                           TopKPostProcess, build_deformable_criterion, build_deformable_detr, build_detr,
                           checkpoint_family, infer_deformable_config, load_detr_checkpoint,
                           ms_deform_attn_sample, save_detr_checkpoint, sigmoid_focal_loss, weighted_loss)
from fqdetr.models.deformable.transformer import encoder_proposals, valid_ratios_of
from fqdetr.models.misc import NestedTensor

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


def test_sampling_locations_for_points_and_boxes():
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    query = torch.randn(1, 1, 8)
    offsets = attn.sampling_offsets(query).view(1, 1, 2, 2, 2, 2)
    shapes = [(4, 8), (2, 3)]
    point = torch.tensor([0.3, 0.6]).expand(1, 1, 2, 2)
    got = attn.sampling_locations(query, point, shapes)  # offsets in pixels of each level
    torch.testing.assert_close(got[0, 0, :, 1, :, 0], 0.3 + offsets[0, 0, :, 1, :, 0] / 3)
    torch.testing.assert_close(got[0, 0, :, 0, :, 1], 0.6 + offsets[0, 0, :, 0, :, 1] / 4)
    box = torch.tensor([0.3, 0.6, 0.2, 0.4]).expand(1, 1, 2, 4)
    got = attn.sampling_locations(query, box, shapes)  # offsets in half box sizes / points
    torch.testing.assert_close(got[0, 0, ..., 0], 0.3 + offsets[0, 0, ..., 0] / 2 * 0.2 * 0.5)
    torch.testing.assert_close(got[0, 0, ..., 1], 0.6 + offsets[0, 0, ..., 1] / 2 * 0.4 * 0.5)


def test_two_stage_proposals_skip_padding_and_the_border():
    shapes = [(4, 4), (2, 2)]
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, [3, 7, 11, 15]] = True  # level 0: last column is padding
    memory = torch.ones(1, 20, 3)
    official = torch.stack([valid_ratios_of(mask[:, :16].view(1, 4, 4)),
                            valid_ratios_of(mask[:, 16:].view(1, 2, 2))], 1)
    kept, logits = encoder_proposals(memory, mask, shapes, official)
    unusable = torch.isinf(logits).any(-1)[0]
    assert unusable[[3, 7, 11, 15]].all() and not kept[0, [3, 7, 11, 15]].any()
    boxes = logits[0, ~unusable].sigmoid()
    torch.testing.assert_close(boxes[0], torch.tensor([0.5 / 3, 0.5 / 4, 0.05, 0.05]))  # valid width 3
    torch.testing.assert_close(logits[0, 16].sigmoid(), torch.tensor([0.25, 0.25, 0.1, 0.1]))
    assert torch.equal(kept[0, ~unusable], memory[0, ~unusable])
    # "strided" ratios: the image spans 2.5 of level 0's 4 columns, so proposals are relative to 2.5
    _, logits = encoder_proposals(memory, mask, shapes, torch.tensor([[[0.625, 1.0], [1.0, 1.0]]]))
    torch.testing.assert_close(logits[0, 0].sigmoid(), torch.tensor([0.5 / 2.5, 0.5 / 4, 0.05, 0.05]))


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


def _canvas(height, width, side=200):
    """One zero image of height x width on a side x side canvas: NestedTensor([1, 3, side, side])."""
    mask = torch.ones(1, side, side, dtype=torch.bool)
    mask[:, :height, :width] = False
    return NestedTensor(torch.zeros(1, 3, side, side), mask)


def test_strided_level_masks_keep_every_level_aligned_with_the_image():
    """A 120 x 160 image on a 200-px canvas (not a multiple of the strides 16-64): with "strided"
    masks it covers ceil(size / stride) cells of every level and exactly size / (stride * cells)
    of it. The official nearest resize (kept for official checkpoints) reads pixel i * 200 / cells,
    so at stride 64 (4 cells, spanning 256 px) it counts the whole width as image."""
    samples = _canvas(120, 160)
    _, masks, _, ratios = _tiny()._levels(samples)
    for level, (mask, stride) in enumerate(zip(masks, (8, 16, 32, 64))):
        cells = math.ceil(200 / stride)
        assert mask.shape == (1, cells, cells)
        assert int((~mask[0, :, 0]).sum()) == math.ceil(120 / stride)
        assert int((~mask[0, 0, :]).sum()) == math.ceil(160 / stride)
        want = torch.tensor([160 / (stride * cells), 120 / (stride * cells)])
        torch.testing.assert_close(ratios[0, level], want)
    official = _tiny(level_masks="nearest")
    _, masks, _, ratios = official._levels(samples)
    assert ratios is None and not masks[3][0, 0, :].any()  # 4 of 4 stride-64 cells "valid": 256 px
    assert official.config["level_masks"] == "nearest" and _tiny().config["level_masks"] == "strided"
    with pytest.raises(ValueError, match="level_masks"):
        _tiny(level_masks="bilinear")


def test_checkpoints_without_level_masks_rebuild_with_the_official_masks(tmp_path):
    """Checkpoints written before ``level_masks`` existed were trained with the nearest resize;
    they must load as such (new ones store the key)."""
    model = _tiny()
    legacy = {k: v for k, v in model.config.items() if k != "level_masks"}
    atomic_torch_save({"model": model.state_dict(), "args": legacy}, tmp_path / "old.pth")
    atomic_torch_save({"model": model.state_dict(), "args": model.config}, tmp_path / "new.pth")
    assert load_detr_checkpoint(tmp_path / "old.pth").backbone[0].level_masks == "nearest"
    assert load_detr_checkpoint(tmp_path / "new.pth").backbone[0].level_masks == "strided"


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


def _detections(bsz=2, queries=6, classes=4, requires_grad=False):
    logits = torch.randn(bsz, queries, classes, requires_grad=requires_grad)
    centres = torch.rand(bsz, queries, 2) * 0.5 + 0.25
    sizes = torch.rand(bsz, queries, 2) * 0.2 + 0.05
    return {"pred_logits": logits, "pred_boxes": torch.cat([centres, sizes], -1)}


TARGETS = [{"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.2], [0.6, 0.3, 0.1, 0.2]])},
           {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]


def test_focal_class_loss_matches_the_official_expression():
    criterion = build_deformable_criterion(num_classes=4, dec_layers=1)
    out = _detections()
    indices = criterion.matcher(out, TARGETS)
    onehot = torch.zeros(2, 6, 4)
    for b, (src, tgt) in enumerate(indices):
        onehot[b, src, TARGETS[b]["labels"][tgt]] = 1.0
    logits = out["pred_logits"]
    prob = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    focal = (0.25 * onehot + 0.75 * (1 - onehot)) * ce * (1 - p_t) ** 2
    num_boxes = 3.0
    official = focal.mean(1).sum() / num_boxes * logits.shape[1]
    torch.testing.assert_close(criterion(out, TARGETS)["loss_ce"], official)
    torch.testing.assert_close(sigmoid_focal_loss(logits, onehot), focal)


def test_per_image_losses_sum_to_the_batch_and_stay_per_image():
    criterion = build_deformable_criterion(num_classes=4, dec_layers=2, two_stage=True)
    out = _detections(requires_grad=True)
    out["aux_outputs"] = [_detections()]
    out["enc_outputs"] = _detections(queries=9, classes=4)
    batch = criterion(out, TARGETS)
    per_image = criterion(out, TARGETS, reduction="per_image")
    assert {"loss_ce_enc", "loss_giou_enc", "loss_bbox_0"} <= set(batch) and set(batch) == set(per_image)
    assert {"loss_ce_enc", "loss_ce_0"} <= set(criterion.weight_dict)
    for key, value in batch.items():
        assert per_image[key].shape == (2,)
        torch.testing.assert_close(per_image[key].sum(), value, msg=key)
    (grad,) = torch.autograd.grad(weighted_loss(per_image, criterion.weight_dict)[0], out["pred_logits"])
    assert grad[0].abs().sum() > 0 and not grad[1].any()


def test_images_without_boxes_and_an_empty_target_list():
    criterion = build_deformable_criterion(num_classes=4, dec_layers=1)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = criterion(_detections(), [empty, empty])
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["loss_ce"].item() > 0 and all(bool(torch.isfinite(v)) for v in losses.values())
    with pytest.raises(ValueError, match="0 targets for a batch of 2"):
        criterion(_detections(), [])


def test_focal_matcher_prefers_the_confident_query():
    out = {"pred_logits": torch.tensor([[[-4.0, 0.0], [3.0, 0.0]]]),
           "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])}
    target = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    src, tgt = FocalHungarianMatcher()(out, target)[0]
    assert src.tolist() == [1] and tgt.tolist() == [0]


def test_topk_postprocess_against_sorting_every_pair():
    out = _detections(queries=5, classes=3)
    sizes = torch.tensor([[100, 200], [50, 40]])
    results = TopKPostProcess(num_select=7)(out, sizes)
    prob = out["pred_logits"].sigmoid()
    for b, result in enumerate(results):
        pairs = sorted(((prob[b, q, c].item(), q, c) for q in range(5) for c in range(3)), reverse=True)[:7]
        torch.testing.assert_close(result["scores"], torch.tensor([p[0] for p in pairs]))
        assert result["labels"].tolist() == [p[2] for p in pairs]
        cx, cy, w, h = out["pred_boxes"][b, pairs[0][1]].tolist()
        height, width = sizes[b].tolist()
        expected = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        torch.testing.assert_close(result["boxes"][0], torch.tensor(expected))
    assert len(TopKPostProcess(num_select=100)(out, sizes)[0]["scores"]) == 15  # all 5 x 3 pairs
    with pytest.raises(ValueError, match="target_sizes must be"):
        TopKPostProcess()(out, torch.tensor([100, 200]))
    with pytest.raises(ValueError, match="num_select"):
        TopKPostProcess(num_select=0)


def test_quantize_model_swaps_deformable_layers_and_trains():
    from fqdetr.quant import QuantConfig, quantize_model
    model = _tiny(with_box_refine=True)
    qmodel, report = quantize_model(model, QuantConfig(w_bits=4, a_bits=8), return_report=True)
    for name in ("transformer.encoder.layers.0.self_attn.sampling_offsets",
                 "transformer.decoder.layers.1.cross_attn.value_proj", "transformer.decoder.layers.0.self_attn"):
        assert name in report.swapped
    criterion = build_deformable_criterion(5, dec_layers=2)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])}]
    weighted_loss(criterion(qmodel(torch.rand(1, 3, 64, 64)), targets), criterion.weight_dict).backward()
    grad = qmodel.transformer.encoder.layers[0].self_attn.sampling_offsets.weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and grad.any()
