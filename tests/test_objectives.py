"""The per-image objectives (docs/METHOD.md sections 1.4 and 2.4): the fixed and per-image
normalisers, and the selective critical modes "matched" and "contrast", for the softmax
(DETR) and sigmoid (Deformable DETR) heads."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fqdetr.critical import CriticalLoss, criterion_like
from fqdetr.models import build_detr
from fqdetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from fqdetr.models.criterion import build_criterion
from fqdetr.models.deformable import build_deformable_criterion
from fqdetr.models.deformable.criterion import sigmoid_focal_loss
from fqdetr.sensitivity import class_normalizer, detr_objectives, mean_objects_per_image, per_image

S = [1, 3]


def _case(num_logits, seed=0, queries=4, batch=2):
    """Random outputs [batch, queries, num_logits] (float64) and two images' targets:
    image 0 has critical objects 1, 3 and a non-critical 0, image 1 one non-critical 2."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, num_logits, generator=gen, dtype=torch.float64) * 2
    cxcy = torch.rand(batch, queries, 2, generator=gen, dtype=torch.float64) * 0.6 + 0.2
    wh = torch.rand(batch, queries, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.1
    outputs = {"pred_logits": logits, "pred_boxes": torch.cat([cxcy, wh], -1)}
    targets = [{"labels": torch.tensor([1, 3, 0]), "boxes": torch.tensor(
                   [[0.3, 0.4, 0.2, 0.2], [0.6, 0.5, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]], dtype=torch.float64)},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.2, 0.3]], dtype=torch.float64)}]
    return outputs, targets[:batch]


def _transformed(z, head):
    """T_S "lse" of one image's logits z [Q, C(+1)] -> [Q, |S|+2] (softmax) or [Q, |S|+1]."""
    if head == "softmax":
        return torch.cat([z[:, S], z[:, [0, 2, 4]].logsumexp(-1, keepdim=True), z[:, 5:]], -1)
    other = torch.log(torch.expm1(F.softplus(z[:, [0, 2, 4]]).sum(-1, keepdim=True)))
    return torch.cat([z[:, S], other], -1)


def _best_assignment(logits, boxes, labels, tgt_boxes, head):
    """(query per target) minimising the matcher's cost, by brute force over every assignment."""
    l1 = (boxes[:, None] - tgt_boxes[None]).abs().sum(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    if head == "softmax":
        cls = -logits.softmax(-1)[:, labels]
        cost = cls + 5 * l1 - 2 * giou
    else:
        p = logits.sigmoid()
        focal = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p ** 2 * -(1 - p + 1e-8).log()
        cost = 2 * focal[:, labels] + 5 * l1 - 2 * giou
    best = min(itertools.permutations(range(len(logits)), len(labels)),
               key=lambda qs: sum(cost[q, k] for k, q in enumerate(qs)))
    return best, l1, giou


def _hand_loss(outputs, targets, i, mode, head, norm):
    """Image i's selective loss by hand (one decoder output; weights 1/5/2 softmax, 2/5/2 sigmoid)."""
    t = targets[i]
    logits = _transformed(outputs["pred_logits"][i], head)
    labels = torch.tensor([S.index(int(l)) if int(l) in S else len(S) for l in t["labels"]])
    best, l1, giou = _best_assignment(logits, outputs["pred_boxes"][i], labels, t["boxes"], head)
    critical = [(q, k) for k, q in enumerate(best) if labels[k] < len(S)]
    box = sum(5 * l1[q, k] + 2 * (1 - giou[q, k]) for q, k in critical)
    cls = 0.0
    if head == "softmax":
        two = torch.cat([logits[:, :2], logits[:, 2:].logsumexp(-1, keepdim=True)], -1)  # S vs the rest
        for q in range(len(logits)):
            k = next((k for q2, k in critical if q2 == q), None)
            if k is not None:
                cls += -(logits if mode == "matched" else two)[q].log_softmax(-1)[labels[k]]
            elif mode == "contrast":
                cls += 0.1 * -two[q].log_softmax(-1)[2]
        return (cls + box) / norm
    for q in range(len(logits)):
        k = next((k for q2, k in critical if q2 == q), None)
        cols = logits[q] if mode == "matched" else logits[q, :2]
        onehot = torch.zeros_like(cols)
        if k is not None:
            onehot[labels[k]] = 1.0
            cls += sigmoid_focal_loss(cols, onehot).sum()
        elif mode == "contrast":
            cls += 0.1 * sigmoid_focal_loss(cols, onehot).sum()
    return (2 * cls + box) / norm


def _criterion(head):
    if head == "softmax":
        return build_criterion(5, dec_layers=1, aux_loss=False)
    return build_deformable_criterion(5, dec_layers=1, aux_loss=False)


@pytest.mark.parametrize("normalizer", ["fixed", "per_image"])
@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("mode", ["matched", "contrast"])
def test_selective_modes_match_a_hand_computation(mode, head, normalizer):
    outputs, targets = _case(6 if head == "softmax" else 5)
    got = detr_objectives(_criterion(head), None, S, mode=mode, normalizer=normalizer, objects_per_image=3.0,
                          critical_objects_per_image=0.75)["critical"](outputs, targets)
    for i in range(2):
        # per-critical-object normalisation: the image's own critical count (at least 1), or the constant
        norm = max(sum(int(l) in S for l in targets[i]["labels"]), 1) if normalizer == "per_image" else 0.75
        assert float(got[i]) == pytest.approx(float(_hand_loss(outputs, targets, i, mode, head, norm)), rel=1e-10)
    if mode == "matched":  # image 1 has no critical object: no term at all
        assert float(got[1]) == 0.0
    else:
        assert float(got[1]) > 0.0


def test_fixed_normaliser_of_the_softmax_head_by_hand():
    """overall loss, fixed: CE summed over queries / (n0 + 0.1 (Q - n0)), boxes summed / n0."""
    outputs, targets = _case(6)
    criterion = _criterion("softmax")
    got = per_image(criterion, outputs, targets, "fixed", objects_per_image=2.0)
    assert class_normalizer(criterion, 4, 2.0) == pytest.approx(2.0 + 0.1 * 2)
    for i, t in enumerate(targets):
        logits = outputs["pred_logits"][i]
        best, l1, giou = _best_assignment(logits, outputs["pred_boxes"][i], t["labels"], t["boxes"], "softmax")
        target = torch.full((4,), 5)
        target[list(best)] = t["labels"]
        weight = torch.ones(6, dtype=torch.float64)
        weight[5] = 0.1
        ce = F.cross_entropy(logits, target, weight, reduction="sum") / 2.2
        box = sum(5 * l1[q, k] + 2 * (1 - giou[q, k]) for k, q in enumerate(best)) / 2.0
        # the criterion's eos weight is a float32 buffer: 0.1 to ~1e-8 relative
        assert float(got[i]) == pytest.approx(float(ce + box), rel=1e-8)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("mode", ["lse", "drop", "matched", "contrast"])
@pytest.mark.parametrize("normalizer", ["fixed", "per_image"])
def test_objectives_do_not_depend_on_the_batch(mode, head, normalizer):
    """Each image's loss in a batch equals its loss alone (what per-sample Fisher needs)."""
    outputs, targets = _case(6 if head == "softmax" else 5, seed=1)
    objectives = detr_objectives(_criterion(head), None, S, mode=mode, normalizer=normalizer,
                                 objects_per_image=2.0, critical_objects_per_image=1.0)
    for name in ("overall", "critical"):
        batch = objectives[name](outputs, targets)
        for i in range(2):
            alone = objectives[name]({k: v[i:i + 1] for k, v in outputs.items()}, targets[i:i + 1])
            assert float(batch[i]) == pytest.approx(float(alone[0]), rel=1e-12), (name, i)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("mode", ["matched", "contrast"])
def test_selective_modes_with_every_class_critical_are_finite(mode, head):
    """S = every class: "other" has probability 0 (a -inf softmax logit); losses and gradients stay finite."""
    outputs, targets = _case(6 if head == "softmax" else 5)
    logits = outputs["pred_logits"].requires_grad_()
    losses = detr_objectives(_criterion(head), None, range(5), mode=mode)["critical"](outputs, targets)
    (grad,) = torch.autograd.grad(losses.sum(), logits)
    assert bool(torch.isfinite(losses).all()) and bool(torch.isfinite(grad).all()) and float(losses[0].detach()) > 0


def test_the_fixed_normaliser_weighs_images_alike():
    """per_image divides an image with one object by 1, one with three by 3; fixed divides both
    by the same constant, so the boxes' share of the loss grows with the objects."""
    outputs, targets = _case(6)
    criterion = _criterion("softmax")
    crit = CriticalLoss(S, 5, lambda n: criterion_like(criterion, n), mode="matched")
    assert crit.num_objects(targets).tolist() == [2.0, 0.0]
    fixed = per_image(criterion, outputs, targets, "fixed", objects_per_image=1.0)
    own = per_image(criterion, outputs, targets, "per_image")
    ce_fixed = criterion(outputs, targets, reduction="per_image", num_boxes=1.0,
                         class_normalizer=class_normalizer(criterion, 4, 1.0))
    ce_own = criterion({k: v[:1] for k, v in outputs.items()}, targets[:1], reduction="per_image", num_boxes=3.0)
    box_fixed = float(5 * ce_fixed["loss_bbox"][0] + 2 * ce_fixed["loss_giou"][0])
    box_own = float(5 * ce_own["loss_bbox"][0] + 2 * ce_own["loss_giou"][0])
    assert box_fixed == pytest.approx(3 * box_own, rel=1e-12)  # image 0 has 3 objects
    assert not torch.allclose(fixed, own)
    with pytest.raises(ValueError, match="normalizer"):
        per_image(criterion, outputs, targets, "batch")
    with pytest.raises(ValueError, match="objects_per_image"):
        per_image(criterion, outputs, targets, "fixed", objects_per_image=0.0)
    with pytest.raises(ValueError, match="mode"):
        detr_objectives(criterion, None, S, mode="selective")


def test_mean_objects_per_image_counts_the_annotations(tmp_path):
    from fqdetr.data import CocoDetection
    from fqdetr.io import write_json
    (tmp_path / "img").mkdir()
    cats = [{"id": 7, "name": "a", "supercategory": "x"}, {"id": 9, "name": "b", "supercategory": "y"}]
    images = [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in (1, 2, 3)]
    anns = [{"id": k, "image_id": img, "category_id": cat, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": crowd}
            for k, (img, cat, crowd) in enumerate([(1, 7, 0), (1, 9, 0), (2, 9, 0), (2, 9, 1)])]
    write_json({"images": images, "annotations": anns, "categories": cats}, tmp_path / "a.json")
    data = CocoDetection(tmp_path / "img", tmp_path / "a.json")
    assert mean_objects_per_image(data) == pytest.approx(3 / 3)  # the crowd region is not an object
    assert mean_objects_per_image(data, [0]) == pytest.approx(1 / 3)
    assert mean_objects_per_image(CocoDetection(tmp_path / "img", tmp_path / "a.json", image_ids=[3])) == 1.0


def _detector(head):
    """(quantized tiny detector with 5 classes, its criterion, layers to check (name, weight))."""
    from fqdetr.models.deformable import build_deformable_detr
    from fqdetr.quant import QuantConfig, quantize_model
    torch.manual_seed(0)
    if head == "softmax":
        model = quantize_model(build_detr("tiny", num_classes=5).eval(), QuantConfig(w_bits=4, a_bits=8))
        criterion = build_criterion(5, dec_layers=model.transformer.decoder.num_layers)
        names = ("transformer.decoder.layers.0.linear1", "class_embed", "bbox_embed.layers.2")
    else:
        model = quantize_model(build_deformable_detr("deformable_tiny", num_classes=5).eval(),
                               QuantConfig(w_bits=4, a_bits=8))
        criterion = build_deformable_criterion(5, dec_layers=2)
        names = ("transformer.decoder.layers.1.cross_attn.sampling_offsets", "class_embed.0",
                 "bbox_embed.0.layers.2")
    return model, criterion, [(n, model.get_submodule(n).weight) for n in names]


@pytest.mark.parametrize("head, mode", [("softmax", "matched"), ("softmax", "contrast"), ("sigmoid", "contrast")])
def test_fisher_of_the_selective_modes_equals_a_per_image_autograd_loop(head, mode):
    from fqdetr.sensitivity import fisher_traces
    model, criterion, layers = _detector(head)
    gen = torch.Generator().manual_seed(3)
    images, mask = torch.rand(2, 3, 64, 64, generator=gen), torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.1, 0.1]])},
               {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.6, 0.4, 0.5, 0.5], [0.3, 0.6, 0.2, 0.3]])}]
    model((images, mask))  # activation scales from this batch
    critical = detr_objectives(criterion, None, S, mode=mode, objects_per_image=2.0,
                               critical_objects_per_image=1.5)["critical"]
    traces = fisher_traces(model, [(images, mask, targets)], critical, progress=False)
    losses = critical(model((images, mask)), targets)
    weights = [w for _, w in layers]
    grads = [torch.autograd.grad(losses[n], weights, retain_graph=True) for n in range(2)]
    for k, (name, _) in enumerate(layers):
        expected = sum(float(g[k].square().sum()) for g in grads) / 2
        assert expected > 0 and math.isfinite(traces[name])
        assert traces[name] == pytest.approx(expected, rel=1e-4), name
