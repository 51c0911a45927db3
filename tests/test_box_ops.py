"""Box conversions and (generalized) IoU against values worked out by hand: the matcher, the
criteria and their test oracles all call these functions, so they need an oracle of their own."""
import pytest
import torch

from fqdetr.models.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                                   elementwise_generalized_box_iou, generalized_box_iou)

# (box a, box b, IoU, GIoU), boxes x0 y0 x1 y1. GIoU = IoU - (hull - union) / hull.
CASES = [
    ([0, 0, 1, 1], [0, 0, 1, 1], 1.0, 1.0),                       # identical
    ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, 0.0 - (3 - 2) / 3),         # disjoint: hull 3, union 2
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0, 0.0),                       # touching: hull = union = 2
    ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16, 4 / 16),                 # nested: hull = union = a
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - (9 - 7) / 9),     # partial: inter 1, union 7, hull 9
    ([0, 0, 2, 1], [3, 2, 4, 4], 0.0, 0.0 - (16 - 4) / 16),       # apart in x and y: hull 4 x 4
]


@pytest.mark.parametrize("a, b, iou, giou", CASES)
def test_iou_and_giou_equal_the_hand_computed_values(a, b, iou, giou):
    a, b = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    assert box_iou(a, b)[0].item() == pytest.approx(iou, abs=1e-12)
    assert generalized_box_iou(a, b).item() == pytest.approx(giou, abs=1e-12)
    assert generalized_box_iou(b, a).item() == pytest.approx(giou, abs=1e-12)  # symmetric
    assert elementwise_generalized_box_iou(a, b).item() == pytest.approx(giou, abs=1e-12)


def test_elementwise_giou_is_the_diagonal_of_the_pairwise_one():
    boxes = torch.tensor([case[0] for case in CASES], dtype=torch.float64)
    others = torch.tensor([case[1] for case in CASES], dtype=torch.float64)
    pairwise = generalized_box_iou(boxes, others)
    assert pairwise.shape == (len(CASES), len(CASES))
    assert torch.equal(elementwise_generalized_box_iou(boxes, others), pairwise.diagonal())
    assert torch.allclose(pairwise.diagonal(), torch.tensor([case[3] for case in CASES], dtype=torch.float64))


def test_box_conversions_are_inverse_and_match_a_hand_example():
    cxcywh = torch.tensor([[0.5, 0.25, 0.2, 0.1]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(xyxy, torch.tensor([[0.4, 0.2, 0.6, 0.3]]))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
