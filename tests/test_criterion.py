"""SetCriterion: DETR's batch losses, and per-image losses that sum to them exactly."""
import math

import pytest
import torch
import torch.nn.functional as F

from fqdetr.models import HungarianMatcher, SetCriterion, build_criterion, detr_weight_dict, weighted_loss

NUM_CLASSES = 6


def _case(seed, sizes, nq=5, n_aux=2):
    gen = torch.Generator().manual_seed(seed)
    bs = len(sizes)

    def head():
        logits = torch.randn(bs, nq, NUM_CLASSES + 1, generator=gen).requires_grad_()
        raw = torch.randn(bs, nq, 4, generator=gen).requires_grad_()
        return logits, raw

    heads = [head() for _ in range(n_aux + 1)]
    # boxes through a sigmoid as in DETR; keep the leaf (raw) for gradient checks
    dicts = [{"pred_logits": lg, "pred_boxes": raw.sigmoid() * 0.5 + 0.25} for lg, raw in heads]
    outputs = dict(dicts[-1], aux_outputs=dicts[:-1])
    targets = []
    for n in sizes:
        cxcy = torch.rand(n, 2, generator=gen) * 0.5 + 0.25
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen),
                        "boxes": torch.cat([cxcy, wh], 1)})
    leaves = [t for pair in heads for t in pair]
    return outputs, targets, leaves


def _criterion(n_aux=2):
    return SetCriterion(NUM_CLASSES, HungarianMatcher(), detr_weight_dict(n_aux + 1), eos_coef=0.1)


@pytest.mark.parametrize("seed,sizes", [(0, [2, 0, 3]), (1, [1, 4]), (2, [5, 5, 1, 2])])
def test_per_image_sums_to_batch_loss(seed, sizes):
    outputs, targets, _ = _case(seed, sizes)
    crit = _criterion()
    batch = crit(outputs, targets)
    per = crit(outputs, targets, reduction="per_image")
    assert set(batch) == set(per)
    # every term with the aux suffixes _0, _1, and the logged metrics
    for base in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
        assert {base, base + "_0", base + "_1"} <= set(batch)
    assert "class_error" in batch
    for k in batch:
        assert batch[k].dim() == 0 and per[k].shape == (len(sizes),), k
        torch.testing.assert_close(per[k].sum(0), batch[k], rtol=1e-5, atol=1e-5, msg=k)
    # an image without targets has no box loss, but still a class loss (no-object queries)
    for i, n in enumerate(sizes):
        if n == 0:
            assert per["loss_bbox"][i] == 0 and per["loss_giou"][i] == 0 and per["loss_ce"][i] > 0


def test_per_image_gradient_equals_batch_gradient():
    outputs, targets, leaves = _case(3, [3, 0, 2])
    crit = _criterion()
    g_batch = torch.autograd.grad(weighted_loss(crit(outputs, targets), crit.weight_dict), leaves,
                                  retain_graph=True)
    per = weighted_loss(crit(outputs, targets, reduction="per_image"), crit.weight_dict)
    assert per.shape == (3,)
    g_per = torch.autograd.grad(per.sum(), leaves, retain_graph=True)
    for a, b in zip(g_batch, g_per):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # image 1's loss depends on image 1's predictions only
    g1 = torch.autograd.grad(per[1], leaves[0])[0]
    assert g1[0].abs().sum() == 0 and g1[2].abs().sum() == 0 and g1[1].abs().sum() > 0


def test_batch_losses_match_definitions():
    """Hand-built case: one image, perfect box on query 0, target class 2."""
    logits = torch.zeros(1, 3, NUM_CLASSES + 1)
    logits[0, 0, 2] = 3.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    crit = SetCriterion(NUM_CLASSES, HungarianMatcher(), {"loss_ce": 1}, eos_coef=0.1)
    out = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert out["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    nll0 = -F.log_softmax(logits[0, 0], -1)[2].item()
    nll_empty = math.log(NUM_CLASSES + 1)  # uniform logits on queries 1, 2
    expected = (1.0 * nll0 + 0.1 * 2 * nll_empty) / (1.0 + 0.1 * 2)
    assert out["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    assert out["class_error"].item() == pytest.approx(0.0)
    # argmax of queries 1, 2 is class 0 (ties -> first), so 3 predicted objects vs 1 target
    assert out["cardinality_error"].item() == pytest.approx(2.0)


def test_fixed_normaliser_and_options():
    outputs, targets, _ = _case(4, [2, 2], n_aux=0)
    crit = _criterion(n_aux=0)
    default = crit(outputs, targets, reduction="per_image")
    fixed = crit(outputs, targets, reduction="per_image", num_boxes=8.0)
    # box terms scale with 1/num_boxes (4 targets by default), the class term does not
    torch.testing.assert_close(fixed["loss_bbox"] * 2, default["loss_bbox"])
    torch.testing.assert_close(fixed["loss_ce"], default["loss_ce"])
    with pytest.raises(ValueError, match="reduction"):
        crit(outputs, targets, reduction="mean")
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(3, HungarianMatcher(), {}, losses=("labels", "masks"))


def test_build_criterion_weights():
    crit = build_criterion(num_classes=91, dec_layers=6)
    assert crit.empty_weight.shape == (92,) and crit.empty_weight[-1] == pytest.approx(0.1)
    assert crit.weight_dict["loss_bbox_4"] == 5.0 and "loss_ce_5" not in crit.weight_dict
    assert len(crit.weight_dict) == 3 * 6
