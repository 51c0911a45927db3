"""DETR model: official parameter names/shapes, forward/backward, checkpoints, postprocess."""
import argparse
import math
import os

import pytest
import torch
from torch import nn

from fqdetr.models import (DETR, FrozenBatchNorm2d, NestedTensor, PositionEmbeddingSine, PostProcess,
                           build_detr, load_detr_checkpoint, nested_tensor_from_tensor_list,
                           save_detr_checkpoint)
from fqdetr.models.backbone import ResNetBody


# ---------------------------------------------------------------- official key list
def _bn(prefix, c):
    return {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}


def _official_resnet(blocks, bottleneck):
    """torchvision ResNet trunk (no fc) under DETR's 'backbone.0.body.' prefix."""
    p = "backbone.0.body"
    keys = {f"{p}.conv1.weight": (64, 3, 7, 7), **_bn(f"{p}.bn1", 64)}
    expansion = 4 if bottleneck else 1
    cin = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for j in range(n):
            b, cout = f"{p}.layer{stage}.{j}", planes * expansion
            if bottleneck:
                keys.update({f"{b}.conv1.weight": (planes, cin, 1, 1), **_bn(f"{b}.bn1", planes),
                             f"{b}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{b}.bn2", planes),
                             f"{b}.conv3.weight": (cout, planes, 1, 1), **_bn(f"{b}.bn3", cout)})
            else:
                keys.update({f"{b}.conv1.weight": (planes, cin, 3, 3), **_bn(f"{b}.bn1", planes),
                             f"{b}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{b}.bn2", planes)})
            if j == 0 and (stage > 1 or cin != cout):
                keys.update({f"{b}.downsample.0.weight": (cout, cin, 1, 1), **_bn(f"{b}.downsample.1", cout)})
            cin = cout
    return keys, cin


def _attn(prefix, d):
    return {f"{prefix}.in_proj_weight": (3 * d, d), f"{prefix}.in_proj_bias": (3 * d,),
            f"{prefix}.out_proj.weight": (d, d), f"{prefix}.out_proj.bias": (d,)}


def _linear(prefix, cin, cout):
    return {f"{prefix}.weight": (cout, cin), f"{prefix}.bias": (cout,)}


def _ln(prefix, d):
    return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def _official_detr_keys(blocks, bottleneck=True, d=256, ffn=2048, layers=6, queries=100, classes=91):
    keys, channels = _official_resnet(blocks, bottleneck)
    for i in range(layers):
        e = f"transformer.encoder.layers.{i}"
        keys.update({**_attn(f"{e}.self_attn", d), **_linear(f"{e}.linear1", d, ffn),
                     **_linear(f"{e}.linear2", ffn, d), **_ln(f"{e}.norm1", d), **_ln(f"{e}.norm2", d)})
        c = f"transformer.decoder.layers.{i}"
        keys.update({**_attn(f"{c}.self_attn", d), **_attn(f"{c}.multihead_attn", d),
                     **_linear(f"{c}.linear1", d, ffn), **_linear(f"{c}.linear2", ffn, d),
                     **_ln(f"{c}.norm1", d), **_ln(f"{c}.norm2", d), **_ln(f"{c}.norm3", d)})
    keys.update(_ln("transformer.decoder.norm", d))
    keys.update(_linear("class_embed", d, classes + 1))
    for i, out in enumerate((d, d, 4)):
        keys.update(_linear(f"bbox_embed.layers.{i}", d, out))
    keys.update({"query_embed.weight": (queries, d), "input_proj.weight": (d, channels, 1, 1),
                 "input_proj.bias": (d,)})
    return keys


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,blocks,bottleneck", [("r50", (3, 4, 6, 3), True),
                                                    ("r101", (3, 4, 23, 3), True),
                                                    ("r18", (2, 2, 2, 2), False)])
def test_official_state_dict_names_and_shapes(name, blocks, bottleneck):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_detr(name)
    expected = _official_detr_keys(blocks, bottleneck)
    got = _shapes(model)
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    assert len(got) == len(expected)


# ---------------------------------------------------------------- backbone pieces
def test_frozen_batchnorm_matches_eval_batchnorm_and_drops_counter():
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())  # carries num_batches_tracked: must be accepted
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(frozen(x), bn(x))
    assert list(frozen.parameters()) == [] and "num_batches_tracked" not in frozen.state_dict()


def test_trainable_layers_and_dilation():
    model = build_detr("tiny", num_classes=3, trainable_layers=("layer2", "layer3", "layer4"))
    body = model.backbone[0].body
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad and body.layer4[1].conv2.weight.requires_grad
    frozen = build_detr("tiny", num_classes=3, train_backbone=False)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    x = torch.randn(1, 3, 64, 64)
    assert ResNetBody("resnet18", width=8)(x).shape == (1, 64, 2, 2)
    assert ResNetBody("resnet18", width=8, dilation=True)(x).shape == (1, 64, 4, 4)
    assert ResNetBody("resnet50", width=8, dilation=True)(x).shape == (1, 256, 4, 4)


def test_from_scratch_presets_train_every_backbone_parameter():
    """The CPU presets have no pretrained weights to preserve: the stem's BatchNorm affine trains
    too (it was left frozen at 1 / 0 when the pattern list named conv1 but not bn1)."""
    from fqdetr.models import build_deformable_detr
    for model in (build_detr("tiny", num_classes=3, norm="batch"),
                  build_deformable_detr("deformable_tiny", num_classes=3, norm="batch")):
        body = model.backbone[0].body
        assert body.bn1.weight.requires_grad and body.bn1.bias.requires_grad
        assert all(p.requires_grad for p in model.backbone.parameters())


def test_backbone_weights_from_a_detector_checkpoint_or_an_imagenet_file(tmp_path):
    from fqdetr.models import build_deformable_detr, load_resnet_weights
    torch.manual_seed(0)
    source = build_deformable_detr("deformable_tiny", num_classes=3, norm="batch")
    source.backbone[0].body.bn1.running_mean.normal_()  # a buffer travels too
    save_detr_checkpoint(source, tmp_path / "deformable.pth")
    body_sd = source.backbone[0].body.state_dict()
    torch.save({**body_sd, "fc.weight": torch.zeros(5, 128)}, tmp_path / "imagenet.pth")  # torchvision layout
    expected = {k: v for k, v in body_sd.items() if not k.endswith("num_batches_tracked")}
    for file in ("deformable.pth", "imagenet.pth"):
        # another family, the other norm: only the body's weights and statistics must fit
        target = build_detr("tiny", num_classes=7, backbone_width=16, dilation=True)
        head_before = target.class_embed.weight.clone()
        load_resnet_weights(target, tmp_path / file)
        got = target.backbone[0].body.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), file
        assert torch.equal(target.class_embed.weight, head_before)  # nothing outside the body
    with pytest.raises(ValueError, match=r"shape mismatches: .*conv1.weight: checkpoint \(16, 3, 7, 7\) vs model \(24, 3, 7, 7\)"):
        load_resnet_weights(build_detr("tiny", num_classes=3, backbone_width=24), tmp_path / "deformable.pth")
    # FrozenBatchNorm files (official checkpoints) have no num_batches_tracked: a BatchNorm model takes them
    frozen = build_detr("tiny", num_classes=3, backbone_width=16)
    frozen.backbone[0].body.bn1.running_var.uniform_(0.5, 2.0)  # not the fresh model's ones
    save_detr_checkpoint(frozen, tmp_path / "frozen.pth")
    target = build_detr("tiny", num_classes=3, backbone_width=16, norm="batch")
    load_resnet_weights(target, tmp_path / "frozen.pth")
    assert torch.equal(target.backbone[0].body.bn1.running_var, frozen.backbone[0].body.bn1.running_var)
    torch.save({"model": {"class_embed.weight": torch.zeros(3, 4)}}, tmp_path / "headless.pth")
    with pytest.raises(ValueError, match="missing keys: bn1"):
        load_resnet_weights(build_detr("tiny", num_classes=3), tmp_path / "headless.pth")


def test_sine_position_encoding_values_and_padding_invariance():
    pe = PositionEmbeddingSine(num_pos_feats=8)
    h, w = 3, 4
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    pos = pe(NestedTensor(torch.zeros(1, 1, h, w), mask))
    assert pos.shape == (1, 16, h, w)
    # pixel (i, j): y = (i+1)/h * 2pi, x = (j+1)/w * 2pi; channel 2k sin, 2k+1 cos of v / T^(2k/8)
    i, j = 1, 2
    y, x = (i + 1) / h * 2 * math.pi, (j + 1) / w * 2 * math.pi
    for k in range(4):
        f = 10000 ** (2 * k / 8)
        assert pos[0, 2 * k, i, j].item() == pytest.approx(math.sin(y / f), abs=1e-5)
        assert pos[0, 2 * k + 1, i, j].item() == pytest.approx(math.cos(y / f), abs=1e-5)
        assert pos[0, 8 + 2 * k, i, j].item() == pytest.approx(math.sin(x / f), abs=1e-5)
        assert pos[0, 9 + 2 * k, i, j].item() == pytest.approx(math.cos(x / f), abs=1e-5)
    padded = torch.ones(1, h + 2, w + 3, dtype=torch.bool)
    padded[:, :h, :w] = False
    pos_p = pe(NestedTensor(torch.zeros(1, 1, h + 2, w + 3), padded))
    torch.testing.assert_close(pos_p[..., :h, :w], pos)


# ---------------------------------------------------------------- tiny model end to end
def _padded_batch():
    gen = torch.Generator().manual_seed(0)
    return nested_tensor_from_tensor_list([torch.randn(3, 96, 128, generator=gen),
                                           torch.randn(3, 128, 80, generator=gen)])


def test_tiny_forward_backward_on_padded_batch():
    torch.manual_seed(0)
    model = build_detr("tiny", num_classes=7)
    samples = _padded_batch()
    assert samples.tensors.shape == (2, 3, 128, 128) and samples.mask[0, 100, 0] and not samples.mask[0, 95, 127]
    out = model(samples)
    q = model.num_queries
    assert out["pred_logits"].shape == (2, q, 8) and out["pred_boxes"].shape == (2, q, 4)
    assert len(out["aux_outputs"]) == model.config["dec_layers"] - 1
    for d in [out] + out["aux_outputs"]:
        assert torch.isfinite(d["pred_logits"]).all() and ((d["pred_boxes"] > 0) & (d["pred_boxes"] < 1)).all()
    loss = out["pred_logits"].logsumexp(-1).mean() + out["pred_boxes"].sum() + \
        sum(a["pred_boxes"].sum() for a in out["aux_outputs"])
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["backbone.0.body.conv1.weight"].abs().sum() > 0
    # the feature mask follows the padding: image 1 is narrower, so it has masked columns
    feats, _ = model.backbone(samples)
    assert feats.mask[1, :, -1].all() and not feats.mask[1, :, 0].any() and feats.mask[0, -1, :].all()
    # aux_loss off: no aux outputs; (images, mask) tuple input accepted
    model.aux_loss = False
    assert "aux_outputs" not in model((samples.tensors, samples.mask))


def test_transformer_ignores_masked_memory():
    """Extra padded feature positions, whatever their values, do not change the decoder
    output: the key padding mask must reach every attention over the memory."""
    torch.manual_seed(0)
    model = build_detr("tiny", num_classes=3).eval()
    d = model.transformer.d_model
    src = torch.randn(1, d, 2, 3)
    big = torch.randn(1, d, 4, 5) * 10
    big[..., :2, :3] = src
    mask_small = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask_big = torch.ones(1, 4, 5, dtype=torch.bool)
    mask_big[:, :2, :3] = False
    pe = model.backbone[1]
    with torch.no_grad():
        query = model.query_embed.weight
        hs_a, mem_a = model.transformer(src, mask_small, query, pe(NestedTensor(src, mask_small)))
        hs_b, mem_b = model.transformer(big, mask_big, query, pe(NestedTensor(big, mask_big)))
    assert hs_a.shape == (model.config["dec_layers"], 1, model.num_queries, d)
    torch.testing.assert_close(hs_a, hs_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mem_a, mem_b[..., :2, :3], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- checkpoints
def _tiny(num_classes=5, **kw):
    torch.manual_seed(1)
    return build_detr("tiny", num_classes=num_classes, **kw).eval()


def test_checkpoint_round_trip(tmp_path):
    model = _tiny()
    x = torch.randn(1, 3, 64, 96)
    path = tmp_path / "ckpt.pth"
    save_detr_checkpoint(model, path, extra={"epoch": 3})
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temporary left behind
    torch.manual_seed(99)
    other = build_detr("tiny", num_classes=5)  # different weights until loaded
    with torch.no_grad():
        ref = model(x)
        assert not torch.equal(other.eval()(x)["pred_logits"], ref["pred_logits"])
        for loaded in (load_detr_checkpoint(path), load_detr_checkpoint(path, other)):
            out = loaded.eval()(x)
            assert torch.equal(out["pred_logits"], ref["pred_logits"])
            assert torch.equal(out["pred_boxes"], ref["pred_boxes"])
    assert torch.load(path, weights_only=True)["epoch"] == 3


def test_official_style_checkpoint_is_inferred(tmp_path):
    """Official files hold an argparse.Namespace and nothing of our config."""
    model = _tiny(num_classes=4)
    ns = argparse.Namespace(nheads=4, dilation=False, dropout=0.1, position_embedding="sine", lr=1e-4)
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "args": ns}, path)
    loaded = load_detr_checkpoint(path).eval()
    assert loaded.config["backbone"] == "resnet18" and loaded.config["backbone_width"] == 16
    assert loaded.num_classes == 4 and loaded.transformer.nhead == 4
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)["pred_logits"], model(x)["pred_logits"])
    # panoptic checkpoints wrap DETR as "detr.*" beside a mask head
    pan = {f"detr.{k}": v for k, v in model.state_dict().items()}
    pan["mask_head.lay1.weight"] = torch.zeros(1)
    torch.save({"model": pan}, tmp_path / "panoptic.pth")
    assert load_detr_checkpoint(tmp_path / "panoptic.pth", nheads=4).num_classes == 4


def test_checkpoint_errors(tmp_path):
    model = _tiny()
    sd = model.state_dict()
    sd.pop("query_embed.weight")
    sd["extra_head.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.pth"
    torch.save({"model": sd}, bad)
    with pytest.raises(ValueError) as err:
        load_detr_checkpoint(bad, _tiny())
    assert "query_embed.weight" in str(err.value) and "extra_head.weight" in str(err.value)
    good = tmp_path / "good.pth"
    save_detr_checkpoint(model, good)
    shape_msg = r"2 shape mismatches: .*class_embed\.weight: checkpoint \(6, 64\) vs model \(10, 64\)"
    with pytest.raises(ValueError, match=shape_msg):
        load_detr_checkpoint(good, _tiny(num_classes=9))
    with pytest.warns(UserWarning, match="class_embed"):  # non-strict: loads what fits
        partial = load_detr_checkpoint(good, _tiny(num_classes=9), strict=False)
    assert torch.equal(partial.query_embed.weight, model.query_embed.weight)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pth"):
        load_detr_checkpoint(truncated)
    with pytest.raises(FileNotFoundError):
        load_detr_checkpoint(tmp_path / "absent.pth")


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_detr_checkpoint(_tiny(), path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_detr_checkpoint(_tiny(num_classes=2), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pth"]


# ---------------------------------------------------------------- postprocess
def test_postprocess_hand_example():
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0, math.log(5.0)],
                            [math.log(3.0), 0.0, 0.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    res = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert len(res) == 1
    r = res[0]
    assert r["labels"].tolist() == [1, 0]
    torch.testing.assert_close(r["scores"], torch.tensor([2 / 9, 3 / 6]))
    torch.testing.assert_close(r["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]]))
    with pytest.raises(ValueError, match="target sizes"):
        PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[1, 2], [3, 4]]))


def test_build_detr_presets_and_errors():
    with pytest.raises(ValueError, match="unknown DETR preset"):
        build_detr("r999")
    with torch.device("meta"):
        m = build_detr("r50", num_classes=20, num_queries=50)
    assert isinstance(m, DETR) and m.class_embed.out_features == 21 and m.query_embed.num_embeddings == 50
    assert m.config["num_queries"] == 50 and m.aux_loss
