"""DETR's detection transforms, written with PIL, numpy and torch (no torchvision).

Every transform is called as ``t(image, target)`` and returns both. Geometric
transforms see a PIL image and target["boxes"] as absolute xyxy pixels (what
``CocoDetection`` hands them); ``CocoDetection`` normalises the boxes to cxcywh
afterwards, so the order ToTensor/Normalize vs. boxes does not matter.
Randomness comes from Python's ``random`` module (seeded per worker by the
DataLoader), or from a ``random.Random`` passed as ``rng`` for reproducibility.
"""
import numbers
import random

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DETR's COCO scales; the built-in dataset uses its own, see make_transforms.
DETR_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
DETR_MAX_SIZE = 1333


def get_size_with_aspect_ratio(image_size, size, max_size=None):
    """(h, w) with the shorter side ``size`` unless the longer side would exceed
    ``max_size`` (then the longer side is ``max_size``). ``image_size`` is (w, h)."""
    w, h = image_size
    if max_size is not None:
        min_orig, max_orig = float(min(w, h)), float(max(w, h))
        if max_orig / min_orig * size > max_size:
            size = int(round(max_size * min_orig / max_orig))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image, target, size, max_size=None):
    """Resize a PIL image (shorter side ``size``) and scale boxes [n, 4] and area."""
    h, w = get_size_with_aspect_ratio(image.size, size, max_size)
    ratio_w, ratio_h = w / image.width, h / image.height
    image = image.resize((w, h), Image.BILINEAR)
    if target is None:
        return image, None
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([h, w], dtype=torch.int64)
    return image, target


def hflip(image, target):
    """Mirror a PIL image left-right; xyxy boxes become (W - x1, y0, W - x0, y1)."""
    w = image.width
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if target is not None and "boxes" in target:
        target = dict(target)
        b = target["boxes"]
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=-1)
    return image, target


class RandomResize:
    """Resize so the shorter side is one of ``sizes`` (chosen at random), capped
    by ``max_size`` on the longer side."""

    def __init__(self, sizes, max_size=None, rng=None):
        self.sizes = list(sizes)
        self.max_size = max_size
        self.rng = rng or random

    def __call__(self, image, target=None):
        return resize(image, target, self.rng.choice(self.sizes), self.max_size)


class RandomHorizontalFlip:
    def __init__(self, p=0.5, rng=None):
        self.p = p
        self.rng = rng or random

    def __call__(self, image, target=None):
        if self.rng.random() < self.p:
            return hflip(image, target)
        return image, target


class ToTensor:
    """PIL RGB image -> float32 tensor [3, H, W] in [0, 1]."""

    def __call__(self, image, target=None):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), target


class Normalize:
    """(x - mean) / std per channel on a tensor [3, H, W]."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image, target=None):
        return (image - self.mean) / self.std, target


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target=None):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self):
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"


def make_transforms(split, scales=DETR_SCALES, max_size=DETR_MAX_SIZE, rng=None):
    """DETR's pipelines: "train" = flip + random multi-scale resize; "val"/"test" =
    resize to the largest scale; both end with ToTensor + ImageNet Normalize.
    For the built-in dataset use e.g. ``scales=(112, 128, 144), max_size=192``.
    (DETR's random crop branch is not included: the built-in objects are small.)"""
    normalize = [ToTensor(), Normalize()]
    if split == "train":
        return Compose([RandomHorizontalFlip(rng=rng), RandomResize(scales, max_size, rng=rng)] + normalize)
    if split in ("val", "test"):
        return Compose([RandomResize([max(scales)], max_size)] + normalize)
    raise ValueError(f"unknown split {split!r}: expected 'train', 'val' or 'test'")


def train_scales(image_size):
    """Training shorter sides for evaluation size ``image_size``: 0.75x .. 1x of it in steps of
    1/8, multiples of 8 (at least 32)."""
    return sorted({max(32, int(round(image_size * k / 8 / 8)) * 8) for k in (6, 7, 8)})


def max_size_for(image_size):
    """The longest side a resized image may have for shorter side ``image_size``: 4/3 of it
    (DETR's 800 / 1333 ratio, rounded). Also the default canvas of a model (PadToCanvas)."""
    return int(round(image_size * 4 / 3))


class PadToCanvas:
    """Collate: every image padded at the bottom/right to one fixed ``canvas`` x ``canvas``.

    Called on a list of (image [3, H_i, W_i], target) pairs; returns (images float32
    [B, 3, canvas, canvas], mask bool [B, canvas, canvas] True on padding, list of B targets),
    DETR's NestedTensor as a plain tuple.

    Why a fixed canvas rather than the batch maximum: how much padding surrounds an image
    changes its features (the backbone's frozen BatchNorm turns the zero padding into non-zero
    values that convolutions next to the image's edge read; the nearest-interpolated stride-32
    mask, and the position encoding normalised by it, round differently), so the same image gave
    other detections alone than in a batch (33.9 vs 41.5 mAP at eval batch 1 vs 8 on the
    shipped model). With one canvas an image's input does not depend on its batch. The canvas
    is a property of the model: checkpoint key ``canvas`` (fqdetr.engine.setup.checkpoint_geometry).
    """

    def __init__(self, canvas):
        if isinstance(canvas, bool) or not isinstance(canvas, numbers.Integral) or canvas < 1:
            raise ValueError(f"canvas: expected a positive int (pixels per side), got {canvas!r}")
        self.canvas = int(canvas)

    def __call__(self, batch):
        images, targets = zip(*batch)
        c = self.canvas
        out = images[0].new_zeros((len(images), images[0].shape[0], c, c))
        mask = torch.ones((len(images), c, c), dtype=torch.bool)
        for i, img in enumerate(images):
            h, w = img.shape[-2:]
            if h > c or w > c:
                raise ValueError(f"image {i} of the batch is {h}x{w} pixels, larger than the model's "
                                 f"{c}x{c} canvas: resize it to fit (shorter side, max_size) or use a "
                                 f"model with a larger canvas")
            out[i, :, :h, :w] = img
            mask[i, :h, :w] = False
        return out, mask, list(targets)

    def __repr__(self):
        return f"PadToCanvas({self.canvas})"
