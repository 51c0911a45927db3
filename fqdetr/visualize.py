"""Detection pictures: boxes with a label and score tag, critical classes in a colour of their
own (pure Pillow), and several pictures side by side with titles."""
import math

import torch
from PIL import Image, ImageDraw, ImageFont

# Critical classes stand out in red; every other class is drawn in one neutral blue, so that a
# picture shows at a glance which detections the critical objective is about.
CRITICAL_COLOUR = (230, 30, 30)
OTHER_COLOUR = (40, 140, 230)
TAG_TEXT_COLOUR = (255, 255, 255)
TITLE_HEIGHT, GAP = 16, 6
BACKGROUND = (255, 255, 255)


def _as_pil(image):
    """An RGB copy of ``image``: a PIL image, or a tensor [3, H, W] (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a PIL image or a tensor [3, H, W], got {shape}")
    if image.dtype != torch.uint8:
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy(), "RGB")


def _check_detections(boxes, labels, scores, class_names, critical_labels):
    """boxes [N, 4] float, labels [N] int64, scores [N] float as tensors; ValueError naming the
    argument on a shape mismatch, a non-finite value or a label outside class_names."""
    boxes, labels, scores = (torch.as_tensor(x) for x in (boxes, labels, scores))
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected shape [N, 4] (absolute x0, y0, x1, y1), got {tuple(boxes.shape)}")
    n = boxes.shape[0]
    for name, t in (("labels", labels), ("scores", scores)):
        if t.shape != (n,):
            raise ValueError(f"{name}: expected shape [{n}] (one per box), got {tuple(t.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels: expected integer class indices, got {labels.dtype}")
    if not (torch.isfinite(boxes).all() and torch.isfinite(scores.float()).all()):
        raise ValueError("boxes, scores: expected finite values")
    bad = [int(v) for v in labels if not 0 <= int(v) < len(class_names)]
    bad += [int(v) for v in critical_labels if not 0 <= int(v) < len(class_names)]
    if bad:
        raise ValueError(f"labels / critical_labels: {sorted(set(bad))} outside 0..{len(class_names) - 1} "
                         f"(class_names has {len(class_names)} names)")
    return boxes.float(), labels.long(), scores.float()


def _pixel_box(box, width, height):
    """Inclusive pixel corners (x0, y0, x1, y1) of the absolute box, clipped to the image:
    pixel i covers [i, i + 1), so a box [10, 10, 20, 20] covers pixels 10..19."""
    x0, y0, x1, y1 = box.tolist()
    left, top = max(0, math.floor(x0 + 0.5)), max(0, math.floor(y0 + 0.5))
    right, bottom = min(width, math.floor(x1 + 0.5)) - 1, min(height, math.floor(y1 + 0.5)) - 1
    return left, top, max(left, right), max(top, bottom)


def draw_detections(image, boxes, labels, scores, class_names, critical_labels=(), score_threshold=0.5,
                    line_width=2, tags=True):
    """A copy of ``image`` with each detection scoring >= score_threshold drawn on it.

    image: PIL image or tensor [3, H, W] (uint8, or float in [0, 1]). boxes [N, 4]: absolute
    x0, y0, x1, y1 in pixels of ``image``; labels [N]: class indices into class_names; scores
    [N]. critical_labels: class indices drawn in CRITICAL_COLOUR, the others in OTHER_COLOUR.
    Each box is an outline ``line_width`` pixels wide inside the box; with ``tags`` a filled
    "name score" tag sits on its top edge (above the box when there is room). Lower scores are
    drawn first, so the most confident detection stays on top. Returns an RGB PIL image.
    """
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold: expected a value in [0, 1], got {score_threshold}")
    if line_width < 1:
        raise ValueError(f"line_width: expected an integer >= 1, got {line_width}")
    boxes, labels, scores = _check_detections(boxes, labels, scores, class_names, critical_labels)
    picture = _as_pil(image)
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default()
    critical = {int(c) for c in critical_labels}
    for i in scores.argsort().tolist():
        if scores[i] < score_threshold:
            continue
        colour = CRITICAL_COLOUR if int(labels[i]) in critical else OTHER_COLOUR
        left, top, right, bottom = _pixel_box(boxes[i], *picture.size)
        draw.rectangle((left, top, right, bottom), outline=colour, width=line_width)
        if tags:
            text = f"{class_names[int(labels[i])]} {scores[i]:.2f}"
            tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
            tag_h = ty1 - ty0 + 2
            tag_top = top - tag_h if top >= tag_h else top
            draw.rectangle((left, tag_top, left + tx1 - tx0 + 3, tag_top + tag_h - 1), fill=colour)
            draw.text((left + 2 - tx0, tag_top + 1 - ty0), text, fill=TAG_TEXT_COLOUR, font=font)
    return picture


def side_by_side(images, titles):
    """One RGB picture: ``images`` (PIL) in a row, GAP pixels apart, each under its title, on a
    white background; heights may differ (shorter ones are top-aligned)."""
    images, titles = list(images), list(titles)
    if not images:
        raise ValueError("images: expected at least one image")
    if len(titles) != len(images):
        raise ValueError(f"titles: expected one per image ({len(images)}), got {len(titles)}")
    images = [_as_pil(im) for im in images]
    width = sum(im.width for im in images) + GAP * (len(images) - 1)
    out = Image.new("RGB", (width, TITLE_HEIGHT + max(im.height for im in images)), BACKGROUND)
    draw, font, x = ImageDraw.Draw(out), ImageFont.load_default(), 0
    for im, title in zip(images, titles):
        draw.text((x + 2, 2), str(title), fill=(0, 0, 0), font=font)
        out.paste(im, (x, TITLE_HEIGHT))
        x += im.width + GAP
    return out


def stacked(images):
    """One RGB picture: ``images`` (PIL) one under another, GAP pixels apart, left-aligned."""
    images = [_as_pil(im) for im in images]
    if not images:
        raise ValueError("images: expected at least one image")
    out = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images) +
                            GAP * (len(images) - 1)), BACKGROUND)
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height + GAP
    return out
