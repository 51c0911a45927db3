"""T_S for sigmoid (focal) heads, docs/METHOD.md section 1.2: the noisy-or "other" logit,
the critical objective, transformed evaluation, Fisher traces and the regulariser on
Deformable DETR."""
import itertools
import math

import numpy as np
import pytest
import torch

from fqdetr.critical import (CriticalLoss, critical_transform, criterion_like, noisy_or_logit, transform_logits,
                             transformed_num_classes)
from fqdetr.evaluation import critical_queries, transform_probs
from fqdetr.models import build_deformable_criterion, build_deformable_detr
from fqdetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from fqdetr.models.deformable import sigmoid_focal_loss
from fqdetr.sensitivity import detr_objectives

INF = float("inf")


def direct_noisy_or(z):
    """logit(1 - prod_j (1 - sigmoid(z_j))) over the last dim, computed as written, in float64."""
    q = 1 - torch.prod(1 - torch.sigmoid(z.double()), dim=-1)
    return torch.log(q) - torch.log1p(-q)


def exact_noisy_or(row):
    """The same in 50-digit arithmetic (mpmath), for inputs where float64 as written rounds:
    log(1 - e^-A) + A with A = sum_j log(1 + e^z_j) = -log P(no class)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    if INF in row:
        return INF
    A = mpmath.fsum(mpmath.log1p(mpmath.exp(mpmath.mpf(v))) for v in row if v != -INF)
    return -INF if A == 0 else float(mpmath.log(-mpmath.expm1(-A)) + A)


@pytest.mark.parametrize("dtype,eps", [(torch.float32, 2 ** -23), (torch.float64, 2 ** -52)])
def test_noisy_or_matches_the_direct_formula_on_random_logits(dtype, eps):
    z = torch.randn(2000, 7, dtype=torch.float64) * 3
    ref = direct_noisy_or(z)
    # as written, 1 - prod(...) rounds by ~1e-16 of P(no class) and of P(some class), so its
    # own error grows like 1e-16 e^|ref|; add that to the rounding of the dtype under test
    tol = 8 * eps * (1 + ref.abs()) + 4e-16 * ref.abs().exp()
    got = noisy_or_logit(z.to(dtype)).double()
    assert bool(((got - ref).abs() <= tol).all())
    assert float(ref.abs().max()) > 10  # the range covers large sums too


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 3e-7), (torch.float64, 1e-15)])
def test_noisy_or_is_exact_on_extreme_logits(dtype, rtol):
    rows = [[-200.0, -300.0], [-1000.0, -1000.0], [-90.0, -95.0, -100.0], [50.0, -3.0], [1e4, 2e4],
            [25.0, 30.0, 0.5], [-40.0, 1e-8], [0.0] * 80, [-5.0] * 80, [-INF, -2.0], [-INF, -INF], [INF, 0.0],
            [300.0, -300.0], [-1e-3, -80.0]]
    for row in rows:
        z = torch.tensor(row, dtype=dtype)
        if dtype == torch.float32 and z.min() < -150 and math.isfinite(z.min()):
            continue  # sums of softplus below float32's range: covered in float64
        ref, got = exact_noisy_or(z.double().tolist()), float(noisy_or_logit(z))
        if math.isinf(ref):
            assert got == ref, row
        else:
            assert abs(got - ref) <= rtol * (1 + abs(ref)) * 4, (row, got, ref)
    # many classes at the default prior (Deformable DETR's class bias, p = 0.01)
    z = torch.full((91,), -math.log(99.0), dtype=dtype)
    assert float(noisy_or_logit(z)) == pytest.approx(math.log(1 - 0.99 ** 91) - 91 * math.log(0.99), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noisy_or_gradients_are_finite_at_the_edges(dtype):
    z = torch.tensor([[-200.0, -300.0], [-1e4, -1e4], [50.0, -3.0], [1e4, 2e4], [-40.0, 1e-8], [-INF, -2.0],
                      [-INF, -INF], [INF, 0.0], [0.0, 0.0], [-1e-3, -80.0]], dtype=dtype, requires_grad=True)
    noisy_or_logit(z).sum().backward()
    assert bool(torch.isfinite(z.grad).all())
    # d other / d z_j = sigmoid(z_j) / P(some class)
    finite = z.detach()[[0, 2, 4, 8, 9]].double()
    expected = torch.sigmoid(finite) / -torch.expm1(-torch.nn.functional.softplus(finite).sum(-1, keepdim=True))
    assert torch.allclose(z.grad[[0, 2, 4, 8, 9]].double(), expected, rtol=1e-5)
    assert z.grad[6].tolist() == [0.0, 0.0] and z.grad[5].tolist() == pytest.approx([0.0, 1.0])
    assert z.grad[1].tolist() == pytest.approx([0.5, 0.5])  # logsumexp's gradient where A underflows


def test_noisy_or_gradcheck_and_gradgradcheck():
    for z in (torch.randn(3, 5, dtype=torch.float64) * 3, torch.randn(3, 5, dtype=torch.float64) - 60,
              torch.randn(3, 5, dtype=torch.float64) + 30):
        z.requires_grad_()
        assert torch.autograd.gradcheck(noisy_or_logit, (z,))
        assert torch.autograd.gradgradcheck(noisy_or_logit, (z,))


def test_sigmoid_transform_modes_and_shapes():
    z = torch.randn(2, 3, 6, dtype=torch.float64)
    S = [4, 1]
    lse = transform_logits(z, S, head="sigmoid")
    assert lse.shape == (2, 3, 3)
    assert torch.equal(lse[..., :2], z[..., [1, 4]])  # S sorted: positions follow label order
    # the "other" probability is P(any non-critical class) of independent sigmoids
    p_rest = torch.sigmoid(z[..., [0, 2, 3, 5]])
    assert torch.allclose(torch.sigmoid(lse[..., 2]), 1 - (1 - p_rest).prod(-1), atol=1e-14)
    assert torch.equal(transform_logits(z, S, "max", head="sigmoid")[..., 2], z[..., [0, 2, 3, 5]].amax(-1))
    assert torch.equal(transform_logits(z, S, "drop", head="sigmoid"), z[..., [1, 4]])
    assert [transformed_num_classes(2, m, "sigmoid") for m in ("lse", "max", "drop")] == [3, 3, 2]
    # S = every class: "other" has probability 0 and a focal loss of exactly 0
    every = transform_logits(z.float(), range(6), head="sigmoid")
    assert every.shape == (2, 3, 7) and float(torch.sigmoid(every[..., 6]).max()) == 0.0
    assert float(sigmoid_focal_loss(every[..., 6], torch.zeros(2, 3)).abs().max()) == 0.0
    with pytest.raises(ValueError, match="head"):
        transform_logits(z, S, head="softplus")
    with pytest.raises(ValueError, match="S: class indices"):
        transform_logits(z, [6], head="sigmoid")


def test_softmax_transform_is_unchanged():
    z = torch.randn(2, 3, 7)  # 6 classes + no-object
    t = transform_logits(z, [1, 4])
    assert torch.equal(t[..., [0, 1, 3]], z[..., [1, 4, 6]])
    assert torch.allclose(t[..., 2], z[..., [0, 2, 3, 5]].logsumexp(-1))
    assert torch.allclose(t.softmax(-1)[..., 2], z.softmax(-1)[..., [0, 2, 3, 5]].sum(-1))


# --- the critical objective -------------------------------------------------------------

def _case(seed=0, num_classes=5, queries=4):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, queries, num_classes, generator=gen, dtype=torch.float64) * 2
    cxcy = torch.rand(2, queries, 2, generator=gen, dtype=torch.float64) * 0.6 + 0.2
    wh = torch.rand(2, queries, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.1
    outputs = {"pred_logits": logits, "pred_boxes": torch.cat([cxcy, wh], -1)}
    targets = [{"labels": torch.tensor([1, 3, 0]), "boxes": torch.tensor(
                   [[0.3, 0.4, 0.2, 0.2], [0.6, 0.5, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]], dtype=torch.float64)},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.2, 0.3]], dtype=torch.float64)}]
    return outputs, targets


def _focal_cost(logits, alpha=0.25, gamma=2.0):
    p = logits.sigmoid()
    return alpha * (1 - p) ** gamma * -(p + 1e-8).log() - (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()


def _direct_image_loss(logits, boxes, labels, tgt_boxes, norm=None):
    """One image's focal set loss by brute force over every assignment of targets to queries:
    logits [Q, C'] (already transformed), labels [n] in 0..C'-1. Weights and costs 2/5/2.
    norm: the normaliser (default the image's own object count, at least 1)."""
    n = len(labels)
    l1 = (boxes[:, None] - tgt_boxes[None]).abs().sum(-1)  # [Q, n]
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    cost = 2 * _focal_cost(logits)[:, labels] + 5 * l1 - 2 * giou
    best = min(itertools.permutations(range(len(logits)), n), key=lambda qs: sum(cost[q, k] for k, q in enumerate(qs)))
    onehot = torch.zeros_like(logits)
    for k, q in enumerate(best):
        onehot[q, labels[k]] = 1.0
    norm = norm or max(n, 1)
    focal = sigmoid_focal_loss(logits, onehot).sum() / norm
    box = sum(5 * l1[q, k] + 2 * (1 - giou[q, k]) for k, q in enumerate(best)) / norm if n else 0.0
    return 2 * focal + box


@pytest.mark.parametrize("normalizer", ["fixed", "per_image"])
@pytest.mark.parametrize("mode", ["lse", "max", "drop"])
def test_critical_objective_matches_a_direct_computation(mode, normalizer):
    outputs, targets = _case()
    S = [1, 3]
    criterion = build_deformable_criterion(5, dec_layers=1, aux_loss=False)
    # fixed: one constant for every image, the critical objects' mean where only they count ("drop")
    fixed = 1.5 if mode == "drop" else 2.5
    got = detr_objectives(criterion, None, S, mode=mode, normalizer=normalizer, objects_per_image=2.5,
                          critical_objects_per_image=1.5)["critical"](outputs, targets)
    rest = [0, 2, 4]
    for i, t in enumerate(targets):
        z = outputs["pred_logits"][i]
        if mode == "drop":
            logits, keep = z[:, S], torch.tensor([int(l) in S for l in t["labels"]], dtype=torch.bool)
        else:
            other = direct_noisy_or(z[:, rest]) if mode == "lse" else z[:, rest].amax(-1)
            logits, keep = torch.cat([z[:, S], other[:, None]], -1), torch.ones(len(t["labels"]), dtype=torch.bool)
        labels = torch.tensor([S.index(int(l)) if int(l) in S else len(S) for l in t["labels"]])[keep]
        ref = _direct_image_loss(logits, outputs["pred_boxes"][i], labels, t["boxes"][keep],
                                 fixed if normalizer == "fixed" else None)
        assert float(got[i]) == pytest.approx(float(ref), rel=1e-10), (mode, i)


def test_critical_loss_keeps_the_criterion_kind_and_constants():
    criterion = build_deformable_criterion(5, dec_layers=2, focal_alpha=0.3)
    crit = CriticalLoss([1, 3], 5, lambda n: criterion_like(criterion, n), mode="drop", head="sigmoid")
    assert type(crit.criterion) is type(criterion) and crit.criterion.num_classes == 2
    assert crit.criterion.focal_alpha == 0.3 and crit.criterion.matcher is criterion.matcher
    assert crit.criterion.weight_dict == criterion.weight_dict
    with pytest.raises(TypeError, match="criterion"):
        criterion_like(object(), 3)


def test_two_stage_proposals_pass_unchanged():
    outputs, targets = _case()
    outputs["enc_outputs"] = {"pred_logits": torch.randn(2, 6, 5, dtype=torch.float64),
                              "pred_boxes": outputs["pred_boxes"].repeat(1, 2, 1)[:, :6]}
    new, new_targets = critical_transform(outputs, targets, [1, 3], head="sigmoid")
    assert new["enc_outputs"] is outputs["enc_outputs"] and new["pred_logits"].shape == (2, 4, 3)
    assert new_targets[0]["labels"].tolist() == [0, 1, 2]
    criterion = build_deformable_criterion(5, dec_layers=1, aux_loss=False, two_stage=True)
    losses = detr_objectives(criterion, None, [1, 3])["critical"](outputs, targets)
    assert losses.shape == (2,) and bool(torch.isfinite(losses).all())


# --- transformed evaluation ----------------------------------------------------------------

def test_sigmoid_transformed_probabilities_and_queries():
    probs = np.array([[0.70, 0.10, 0.50, 0.50],    # S={0}: other = 1 - 0.9 * 0.5 * 0.5 = 0.775 > 0.70
                      [0.70, 0.10, 0.20, 0.10],    # other = 1 - 0.9 * 0.8 * 0.9 = 0.352 -> label 0
                      [0.00, 0.00, 0.00, 0.00]])   # tie at 0 goes to "other"
    t = transform_probs(probs, [0], head="sigmoid")
    assert t.shape == (3, 2) and t[:, 1] == pytest.approx([0.775, 0.352, 0.0])
    logits = torch.logit(torch.tensor(probs[:2], dtype=torch.float64))
    assert t[:2, 1] == pytest.approx(torch.sigmoid(transform_logits(logits, [0], head="sigmoid")[:, 1]).numpy())
    keep, labels, scores = critical_queries(probs, [0], head="sigmoid")
    assert keep.tolist() == [False, True, False] and labels[1] == 0 and scores[1] == pytest.approx(0.70)
    keep, _, _ = critical_queries(probs, [0], other="max", head="sigmoid")  # 0.70 beats max 0.50
    assert keep.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="critical labels"):
        transform_probs(probs, [4], head="sigmoid")
    with pytest.raises(ValueError, match="head"):
        transform_probs(probs, [0], head="focal")


# --- Fisher traces and the regulariser on Deformable DETR -----------------------------------

def _tiny_batch():
    gen = torch.Generator().manual_seed(3)
    images, mask = torch.rand(2, 3, 64, 64, generator=gen), torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 48:] = True  # the second image is narrower: padding as in a real batch
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.1, 0.1]])},
               {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.6, 0.4, 0.5, 0.5], [0.3, 0.6, 0.2, 0.3]])}]
    return images, mask, targets


def test_fisher_traces_of_the_critical_objective_on_deformable_detr():
    from fqdetr.quant import QuantConfig, quantize_model
    from fqdetr.sensitivity import fisher_traces
    torch.manual_seed(0)
    model = quantize_model(build_deformable_detr("deformable_tiny", num_classes=5), QuantConfig(w_bits=4, a_bits=8))
    images, mask, targets = _tiny_batch()
    model.eval()
    model((images, mask))  # activation scales from this batch
    critical = detr_objectives(build_deformable_criterion(5, dec_layers=2), None, [1, 3])["critical"]
    traces = fisher_traces(model, [(images, mask, targets)], critical, progress=False)
    assert len(traces) > 30 and all(math.isfinite(v) and v >= 0 for v in traces.values())
    # tr(F_l) = 1/N sum_n ||d l_n / d W_l||^2, by autograd image by image
    names = ("transformer.decoder.layers.1.cross_attn.sampling_offsets",
             "transformer.encoder.layers.0.self_attn.value_proj", "transformer.decoder.layers.0.linear1",
             "class_embed.0", "bbox_embed.0.layers.2")  # the heads every decoder layer shares
    assert model.class_embed[1] is model.class_embed[0]  # still one (quantized) module
    weights = [model.get_submodule(name).weight for name in names]
    losses = critical(model((images, mask)), targets)
    grads = [torch.autograd.grad(losses[n], weights, retain_graph=True) for n in range(2)]
    for k, name in enumerate(names):
        expected = sum(float(g[k].square().sum()) for g in grads) / 2
        assert expected > 0 and traces[name] == pytest.approx(expected, rel=1e-4), name


def test_regularizer_takes_the_deformable_critical_loss_and_its_gradient_is_right():
    from fqdetr.regularize import FisherTraceRegularizer
    torch.manual_seed(0)
    model = build_deformable_detr("deformable_tiny", num_classes=5).double().eval()
    images, mask, targets = _tiny_batch()
    images = images.double()
    targets = [dict(t, boxes=t["boxes"].double()) for t in targets]
    critical = detr_objectives(build_deformable_criterion(5, dec_layers=2), None, [1, 3])["critical"]
    layer = model.transformer.decoder.layers[1].cross_attn
    params = [layer.sampling_offsets.weight, layer.attention_weights.weight]
    reg = FisherTraceRegularizer(params, estimator="per-sample", method="exact")

    def loss_fn(reduction):
        per_image = critical(model((images, mask)), targets)
        return per_image.sum() if reduction == "batch" else per_image

    R = reg(loss_fn)
    losses = loss_fn("per_image")
    grads = [torch.autograd.grad(losses[n], params, retain_graph=True) for n in range(2)]
    assert R.item() == pytest.approx(sum(float(g.square().sum()) for gs in grads for g in gs) / 2, rel=1e-10)
    # dR/dW (a double backward through the deformable sampling) against central differences
    dR = torch.autograd.grad(R, params)
    assert all(bool(g.any()) for g in dR)
    direction = [torch.randn_like(p) for p in params]
    h = 1e-6
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=sign * h)
        values.append(reg(loss_fn).item())
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(d, alpha=sign * h)
    slope = sum(float((g * d).sum()) for g, d in zip(dR, direction))
    assert (values[0] - values[1]) / (2 * h) == pytest.approx(slope, rel=1e-5)


def test_transformed_detections_need_one_box_per_query():
    from fqdetr.evaluation import transformed_detections
    probs = np.array([[0.70, 0.10, 0.20], [0.10, 0.05, 0.90]])
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0]])
    dets = transformed_detections([{"image_id": 7, "probs": probs, "boxes": boxes}], [0], [11, 12, 13],
                                  head="sigmoid")
    assert dets == [{"image_id": 7, "category_id": 11, "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.70}]
    with pytest.raises(ValueError, match="one xyxy box per query"):
        transformed_detections([{"image_id": 7, "probs": probs, "boxes": boxes[:1]}], [0], [11, 12, 13],
                               head="sigmoid")
