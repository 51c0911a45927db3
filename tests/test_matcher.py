"""HungarianMatcher against brute-force enumeration of all assignments."""
import itertools

import pytest
import torch

from fqdetr.models import HungarianMatcher, box_ops


def _random_boxes(n, gen):
    cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([cxcy, wh], 1)


def _brute_force_cost(c):
    """Minimum total cost over all injective maps targets -> queries; c [Q, n]."""
    q, n = c.shape
    if n == 0:
        return 0.0
    return min(sum(c[perm[j], j].item() for j in range(n)) for perm in itertools.permutations(range(q), n))


def _cost_matrix(outputs, targets, i, wc=1.0, wb=5.0, wg=2.0, probs=None):
    """Independent per-image cost, written from the definition."""
    p = probs[i] if probs is not None else outputs["pred_logits"][i].softmax(-1)
    pb, tb, tl = outputs["pred_boxes"][i], targets[i]["boxes"], targets[i]["labels"]
    c = torch.zeros(pb.shape[0], len(tl))
    for a in range(pb.shape[0]):
        for b in range(len(tl)):
            giou = box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(pb[a:a + 1]),
                                               box_ops.box_cxcywh_to_xyxy(tb[b:b + 1]))[0, 0]
            c[a, b] = -wc * p[a, tl[b]] + wb * (pb[a] - tb[b]).abs().sum() - wg * giou
    return c


@pytest.mark.parametrize("seed,nq,sizes", [(0, 4, [2, 0, 4]), (1, 5, [3, 1]), (2, 6, [5, 6, 0]), (3, 3, [1])])
def test_matcher_matches_brute_force(seed, nq, sizes):
    gen = torch.Generator().manual_seed(seed)
    num_classes = 5
    bs = len(sizes)
    outputs = {"pred_logits": torch.randn(bs, nq, num_classes + 1, generator=gen),
               "pred_boxes": torch.stack([_random_boxes(nq, gen) for _ in range(bs)])}
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=gen), "boxes": _random_boxes(n, gen)}
               for n in sizes]
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == bs
    for i, (src, tgt) in enumerate(indices):
        c = _cost_matrix(outputs, targets, i)
        assert src.dtype == torch.int64 and tgt.dtype == torch.int64
        assert len(src) == len(tgt) == min(nq, sizes[i])
        assert len(set(src.tolist())) == len(src) and sorted(tgt.tolist()) == list(range(sizes[i]))
        got = c[src, tgt].sum().item() if len(src) else 0.0
        assert got == pytest.approx(_brute_force_cost(c), abs=1e-4)


def test_matcher_uses_pred_probs_override():
    gen = torch.Generator().manual_seed(7)
    nq, n = 4, 3
    outputs = {"pred_logits": torch.randn(1, nq, 4, generator=gen),
               "pred_boxes": _random_boxes(nq, gen)[None]}
    targets = [{"labels": torch.tensor([0, 1, 2]), "boxes": _random_boxes(n, gen)}]
    # Probabilities that make classification dominate and disagree with the logits.
    probs = torch.zeros(1, nq, 4)
    probs[0, 3, 0] = probs[0, 0, 1] = probs[0, 1, 2] = 1.0
    matcher = HungarianMatcher(cost_class=100.0, cost_bbox=1.0, cost_giou=1.0)
    src, tgt = matcher({**outputs, "pred_probs": probs}, targets)[0]
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 3, 1: 0, 2: 1}
    c = _cost_matrix(outputs, targets, 0, 100.0, 1.0, 1.0, probs=probs)
    assert c[src, tgt].sum().item() == pytest.approx(_brute_force_cost(c), abs=1e-3)


def test_matcher_all_images_empty_and_bad_inputs():
    outputs = {"pred_logits": torch.randn(2, 3, 4), "pred_boxes": torch.rand(2, 3, 4) * 0.2 + 0.3}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    for src, tgt in HungarianMatcher()(outputs, [empty, empty]):
        assert src.numel() == 0 and tgt.numel() == 0
    with pytest.raises(ValueError, match="targets"):
        HungarianMatcher()(outputs, [empty])
    with pytest.raises(ValueError, match="all matcher costs"):
        HungarianMatcher(0, 0, 0)
    bad = dict(outputs, pred_logits=torch.full((2, 3, 4), float("nan")))
    one = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}
    with pytest.raises(ValueError, match="non-finite"):
        HungarianMatcher()(bad, [one, one])


def test_cost_matrices_do_not_depend_on_the_thread_count():
    """Every cost entry is computed on its own (no reduction whose order a thread split could
    change), so 1 and 2 threads give the same bits (docs/METHOD.md section 7): thread-count
    effects on the matching come only from the model's outputs."""
    gen = torch.Generator().manual_seed(7)
    batch, queries, num_classes, sizes = 8, 100, 91, [30, 0, 17, 50, 1, 44, 9, 25]
    outputs = {"pred_logits": torch.randn(batch, queries, num_classes + 1, generator=gen),
               "pred_boxes": torch.stack([_random_boxes(queries, gen) for _ in range(batch)])}
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=gen), "boxes": _random_boxes(n, gen)}
               for n in sizes]
    matcher, threads = HungarianMatcher(), torch.get_num_threads()
    try:
        costs = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            costs[n] = matcher.cost_matrices(outputs, targets)
    finally:
        torch.set_num_threads(threads)
    assert [c.shape for c in costs[1]] == [(queries, n) for n in sizes]
    for one, two in zip(costs[1], costs[2]):
        assert torch.equal(one, two)
