"""fqdetr.visualize: which pixels a drawn box changes, its colour, tags, layouts, bad arguments."""
import numpy as np
import pytest
import torch
from PIL import Image

from fqdetr.visualize import (CRITICAL_COLOUR, GAP, OTHER_COLOUR, TITLE_HEIGHT, draw_detections, side_by_side,
                              stacked)

NAMES = ["person", "car", "dog"]
GREY = (90, 90, 90)


def _grey(w=64, h=48):
    return Image.new("RGB", (w, h), GREY)


def _outline_mask(h, w, x0, y0, x1, y1, width):
    """Pixels of the outline of the pixel block rows y0..y1, columns x0..x1 (inclusive), ``width`` thick."""
    ys, xs = np.mgrid[0:h, 0:w]
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    core = (xs >= x0 + width) & (xs <= x1 - width) & (ys >= y0 + width) & (ys <= y1 - width)
    return inside & ~core


@pytest.mark.parametrize("label, colour", [(0, CRITICAL_COLOUR), (1, OTHER_COLOUR)])
def test_a_box_colours_exactly_its_outline(label, colour):
    out = np.asarray(draw_detections(_grey(), [[10.0, 8.0, 30.0, 40.0]], [label], [0.9], NAMES,
                                     critical_labels=[0], line_width=2, tags=False))
    # box [10, 30) x [8, 40): pixels 10..29 x 8..39
    expected = _outline_mask(48, 64, 10, 8, 29, 39, 2)
    changed = (out != np.array(GREY)).any(-1)
    assert (changed == expected).all()
    assert (out[expected] == np.array(colour)).all()


def test_tag_stays_next_to_its_box_and_the_input_is_untouched():
    image = _grey()
    out = np.asarray(draw_detections(image, torch.tensor([[20.0, 30.0, 50.0, 46.0]]), torch.tensor([0]),
                                     torch.tensor([0.75]), NAMES, critical_labels=[0]))
    changed = (out != np.array(GREY)).any(-1)
    outline = _outline_mask(48, 64, 20, 30, 49, 45, 2)
    tag = changed & ~outline
    assert tag.any()  # the "person 0.75" tag
    ys, xs = np.nonzero(tag)
    assert ys.max() < 30 and xs.min() >= 20  # above the box, from its left edge
    assert (out[tag] == np.array(CRITICAL_COLOUR)).any(-1).mean() > 0.3  # filled with the box's colour
    assert np.asarray(image).tolist() == np.full((48, 64, 3), GREY).tolist()


def test_low_scores_are_skipped_and_tensor_images_accepted():
    image = torch.full((3, 20, 30), 0.5)
    out = draw_detections(image, [[2.0, 2.0, 10.0, 10.0]], [1], [0.2], NAMES, score_threshold=0.3)
    assert out.size == (30, 20)
    assert (np.asarray(out) == 128).all()


def test_boxes_are_clipped_to_the_image():
    out = np.asarray(draw_detections(_grey(20, 20), [[-5.0, -5.0, 40.0, 40.0]], [2], [1.0], NAMES,
                                     line_width=1, tags=False))
    assert (out[_outline_mask(20, 20, 0, 0, 19, 19, 1)] == np.array(OTHER_COLOUR)).all()
    assert (out[1:19, 1:19] == np.array(GREY)).all()


@pytest.mark.parametrize("boxes, labels, scores, critical, match", [
    ([[0, 0, 5, 5]], [0, 1], [0.9], (), "labels: expected shape \\[1\\]"),
    ([[0, 0, 5]], [0], [0.9], (), "boxes: expected shape \\[N, 4\\]"),
    ([[0, 0, 5, 5]], [0], [0.9, 0.1], (), "scores: expected shape \\[1\\]"),
    ([[0, 0, 5, 5]], [3], [0.9], (), "\\[3\\] outside 0..2"),
    ([[0, 0, 5, 5]], [-1], [0.9], (), "\\[-1\\] outside"),
    ([[0, 0, 5, 5]], [0], [0.9], (7,), "critical_labels.*\\[7\\] outside"),
    ([[0, 0, float("nan"), 5]], [0], [0.9], (), "finite"),
    ([[0, 0, 5, 5]], [0.0], [0.9], (), "labels: expected integer"),
])
def test_bad_detections_are_named(boxes, labels, scores, critical, match):
    with pytest.raises(ValueError, match=match):
        draw_detections(_grey(), boxes, labels, scores, NAMES, critical_labels=critical)


def test_bad_image_and_threshold():
    with pytest.raises(ValueError, match="image: expected a PIL image or a tensor"):
        draw_detections(torch.zeros(1, 8, 8), [[0, 0, 1, 1]], [0], [1.0], NAMES)
    with pytest.raises(ValueError, match="score_threshold"):
        draw_detections(_grey(), [[0, 0, 1, 1]], [0], [1.0], NAMES, score_threshold=1.5)


def test_side_by_side_and_stacked_layouts():
    a, b = Image.new("RGB", (10, 12), (255, 0, 0)), Image.new("RGB", (7, 20), (0, 255, 0))
    row = side_by_side([a, b], ["float", "w4"])
    assert row.size == (10 + GAP + 7, TITLE_HEIGHT + 20)
    px = np.asarray(row)
    assert (px[TITLE_HEIGHT:TITLE_HEIGHT + 12, :10] == [255, 0, 0]).all()
    assert (px[TITLE_HEIGHT:, 10 + GAP:] == [0, 255, 0]).all()
    assert (px[:TITLE_HEIGHT, :10] != 255).any()  # the title's text
    grid = stacked([row, a])
    assert grid.size == (row.width, row.height + GAP + 12)
    assert (np.asarray(grid)[row.height + GAP:, :10] == [255, 0, 0]).all()
    with pytest.raises(ValueError, match="titles: expected one per image"):
        side_by_side([a, b], ["only one"])
    with pytest.raises(ValueError, match="images: expected at least one"):
        side_by_side([], [])
