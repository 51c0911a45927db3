"""Built-in "shapes world" detection dataset, written to disk in COCO format.

A tiny DETR must be able to train on it on a CPU, yet the supercategories must
differ in difficulty so that critical-category effects (docs/METHOD.md section 6) show.
Every image is drawn with PIL from a per-image numpy generator seeded by
``(seed, split, index)``: same seed => byte-identical images and json, and image
``i`` does not depend on how many images were requested.

Categories: 4 supercategories x 4 categories (``categories_per_group=4``, the default)
or x 8 (``categories_per_group=8``, 32 categories, for finding 5 of docs/METHOD.md
section 6); a shape family per supercategory, variants within it. COCO ids are
non-contiguous (1-4, 11-14, 21-24, 31-34; with 8 per group 1-8, 11-18, 21-28, 31-38), as
in COCO, so the label <-> category id mapping is exercised. The table and the variants
5-8 of each group (elder, skier, police, runner; van, tractor, tram, bicycle; horse, pig,
goat, deer; parking, no-entry, crossing, warning) are in
``fqdetr.data.synthetic_categories``; the 16-category dataset is byte-identical to the
one made before the 32-category form existed. Below, the variants 1-4:

- ``sign`` (easy): flat saturated symbols of distinct shape and colour (red
  octagon, white triangle with red rim, red-ringed disc, blue square). Mostly
  medium sized, never the colours of the clutter.
- ``vehicle`` (medium): coloured bodies on dark wheels; variants differ in aspect
  ratio and details (cabin, cargo box, window row, two big wheels), so the group is
  easy to find but car/truck/bus get confused.
- ``person`` (harder): a head over a body with random clothing colours; adult and
  child differ only in proportions, worker only in a helmet and vest; persons are
  placed in clusters that overlap and occlude each other.
- ``animal`` (hardest): low-contrast earth tones, the colours of the background
  clutter, which also contains animal-like blobs without heads or legs (hard
  negatives); variants differ by texture (plain, thin stripes, spots, speckle) that
  vanishes at small sizes, and animals are small most often.

Class frequencies follow fixed weights with a long tail inside every group (e.g.
``adult`` 30 vs ``info`` 1.5; the variants 5-8 continue each tail down to 1.0). Object
sizes are drawn per group from COCO's area classes (small < 32^2 <= medium < 96^2 <=
large, in pixels, the thresholds COCOeval uses), so images of at least ~112 px hold all
three. Backgrounds are random gradients with clutter (lines, low-contrast boxes, blobs,
plain discs) and Gaussian pixel noise of random strength, which hides small textured
objects first.
"""
import json
import logging
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from fqdetr.data.synthetic_categories import EARTH, VARIANT_DRAW, bright, categories, jitter
from fqdetr.io import write_json

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
# P(small), P(medium), P(large) per supercategory.
SIZE_PROBS = {"person": (0.45, 0.45, 0.10), "vehicle": (0.30, 0.55, 0.15),
              "animal": (0.60, 0.35, 0.05), "sign": (0.35, 0.55, 0.10)}
# sqrt(area) ranges in pixels of the COCO area classes.
SIZE_RANGES = ((8.0, 31.0), (33.0, 94.0), (97.0, 140.0))
_SPLIT_CODE = {"train": 0, "val": 1}


def _draw_person(d, rng, box, name):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    head = h * (0.30 if name == "child" else 0.20)  # child: proportions only
    skin = jitter(rng, (220, 180, 150), 25)
    d.ellipse([cx - head / 2, y0, cx + head / 2, y0 + head], fill=skin)
    if name == "worker":  # helmet and vest: the only cue separating it from adult
        d.pieslice([cx - head / 2, y0 - 1, cx + head / 2, y0 + head * 0.8], 180, 360,
                   fill=(250, 220, 0))
    body_bottom = y1 - h * (0.35 if name == "cyclist" else 0.30)
    clothes = (255, 120, 0) if name == "worker" else bright(rng)
    d.rectangle([x0 + w * 0.15, y0 + head, x1 - w * 0.15, body_bottom], fill=clothes)
    legs = jitter(rng, (60, 60, 90), 30)
    lw = max(1, int(w * 0.12))
    if name == "cyclist":
        r = min(w / 2, h * 0.35) / 2
        for wx in (x0 + r, x1 - r):
            d.ellipse([wx - r, y1 - 2 * r, wx + r, y1], outline=(20, 20, 20), width=max(1, lw // 2))
        d.line([cx, body_bottom, cx, y1 - r], fill=legs, width=lw)
    else:
        d.line([cx - w * 0.15, body_bottom, x0 + w * 0.2, y1], fill=legs, width=lw)
        d.line([cx + w * 0.15, body_bottom, x1 - w * 0.2, y1], fill=legs, width=lw)


def _draw_vehicle(d, rng, box, name):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    paint = bright(rng)
    glass = (170, 210, 230)
    r = min(h * 0.3, w * 0.2) if name == "motorbike" else h * 0.22
    if name == "motorbike":
        d.line([x0 + r, y1 - r, x0 + w * 0.5, y0 + h * 0.3, x1 - r, y1 - r], fill=paint,
               width=max(1, int(h * 0.12)))
        d.rectangle([x0 + w * 0.35, y0, x0 + w * 0.6, y0 + h * 0.25], fill=(30, 30, 30))
        wheels = (x0 + r, x1 - r)
    elif name == "car":
        d.polygon([(x0 + w * 0.25, y0 + h * 0.45), (x0 + w * 0.35, y0), (x0 + w * 0.7, y0),
                   (x0 + w * 0.8, y0 + h * 0.45)], fill=glass, outline=paint)
        d.rectangle([x0, y0 + h * 0.4, x1, y1 - r], fill=paint)
        wheels = (x0 + w * 0.2, x1 - w * 0.2)
    elif name == "truck":
        d.rectangle([x0, y0, x0 + w * 0.68, y1 - r], fill=jitter(rng, (200, 200, 200), 40))
        d.rectangle([x0 + w * 0.7, y0 + h * 0.3, x1, y1 - r], fill=paint)
        d.rectangle([x0 + w * 0.8, y0 + h * 0.38, x1 - w * 0.04, y0 + h * 0.55], fill=glass)
        wheels = (x0 + w * 0.15, x0 + w * 0.5, x1 - w * 0.15)
    else:  # bus: tall body with a row of windows
        d.rectangle([x0, y0, x1, y1 - r], fill=paint)
        n = 5
        for i in range(n):
            wx = x0 + w * (0.05 + 0.9 * i / n)
            d.rectangle([wx, y0 + h * 0.15, wx + w * 0.9 / n * 0.7, y0 + h * 0.45], fill=glass)
        wheels = (x0 + w * 0.18, x1 - w * 0.18)
    for wx in wheels:
        d.ellipse([wx - r, y1 - 2 * r, wx + r, y1], fill=(25, 25, 25))


def _ellipse_body(d, rng, x0, y0, x1, y1, colour, name):
    """Animal body with the variant's texture, clipped to the ellipse by hand."""
    d.ellipse([x0, y0, x1, y1], fill=colour)
    a, b = (x1 - x0) / 2, (y1 - y0) / 2
    cx, cy = x0 + a, y0 + b
    darker = tuple(int(c * 0.75) for c in colour)  # low contrast on purpose
    if name == "cat":
        for x in np.arange(x0 + a * 0.3, x1 - a * 0.2, max(2.0, a * 0.3)):
            t = b * math.sqrt(max(0.0, 1 - ((x - cx) / a) ** 2))
            d.line([x, cy - t, x, cy + t], fill=darker, width=1)
    elif name == "cow":
        for _ in range(4):
            u, v = rng.uniform(-0.6, 0.6, 2)
            s = max(1.0, a * 0.16)
            d.ellipse([cx + u * a - s, cy + v * b - s, cx + u * a + s, cy + v * b + s],
                      fill=(30, 25, 20) if rng.random() < 0.5 else (235, 235, 230))
    elif name == "sheep":
        for _ in range(10):
            u, v = rng.uniform(-0.7, 0.7, 2)
            d.point((cx + u * a, cy + v * b), fill=darker)


def _draw_animal(d, rng, box, name):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    base = (225, 220, 205) if name == "sheep" else EARTH[rng.integers(len(EARTH))]
    colour = jitter(rng, base, 20)
    legs_top = y0 + h * 0.6
    lw = max(1, int(w * 0.05))
    for fx in (0.2, 0.35, 0.6, 0.75):
        d.line([x0 + w * fx, legs_top, x0 + w * fx, y1], fill=tuple(int(c * 0.6) for c in colour), width=lw)
    _ellipse_body(d, rng, x0, y0 + h * 0.25, x0 + w * 0.82, y0 + h * 0.75, colour, name)
    head_col = (50, 45, 40) if name == "sheep" else colour
    hs = h * (0.30 if name == "cat" else 0.38)
    d.ellipse([x1 - hs, y0, x1, y0 + hs], fill=head_col)
    if name == "cat":  # pointed ears
        d.polygon([(x1 - hs, y0 + hs * 0.3), (x1 - hs * 0.8, y0), (x1 - hs * 0.5, y0 + hs * 0.2)],
                  fill=head_col)


def _draw_sign(d, rng, box, name):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rim = max(1, int(min(w, h) * 0.12))
    if name == "stop":
        pts = [(cx + w / 2 * math.cos(math.pi / 8 + k * math.pi / 4),
                cy + h / 2 * math.sin(math.pi / 8 + k * math.pi / 4)) for k in range(8)]
        d.polygon(pts, fill=(210, 20, 30), outline=(255, 255, 255))
    elif name == "yield":
        d.polygon([(x0, y0), (x1, y0), (cx, y1)], fill=(210, 20, 30))
        d.polygon([(x0 + rim * 1.7, y0 + rim), (x1 - rim * 1.7, y0 + rim), (cx, y1 - rim * 2)],
                  fill=(250, 250, 250))
    elif name == "speed":
        d.ellipse([x0, y0, x1, y1], fill=(250, 250, 250), outline=(210, 20, 30), width=rim)
        d.rectangle([cx - w * 0.15, cy - h * 0.18, cx + w * 0.15, cy + h * 0.18], fill=(20, 20, 20))
    else:  # info
        d.rectangle([x0, y0, x1, y1], fill=(20, 70, 200))
        d.rectangle([cx - w * 0.08, cy - h * 0.1, cx + w * 0.08, y1 - h * 0.2], fill=(250, 250, 250))
        d.ellipse([cx - w * 0.08, y0 + h * 0.15, cx + w * 0.08, y0 + h * 0.3], fill=(250, 250, 250))


_DRAW = {"person": _draw_person, "vehicle": _draw_vehicle, "animal": _draw_animal, "sign": _draw_sign}


def _background(rng, width, height):
    """Gradient background with unannotated clutter; returns (PIL image, draw)."""
    top, bottom = rng.integers(60, 200, (2, 3))
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    arr = (top * (1 - t) + bottom * t) * np.ones((1, width, 1))
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 11))):
        kind = rng.integers(4)
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        s = rng.uniform(6, 40)
        if kind == 0:
            d.line([x, y, x + rng.uniform(-40, 40), y + rng.uniform(-40, 40)],
                   fill=jitter(rng, (90, 90, 90), 60), width=int(rng.integers(1, 3)))
        elif kind == 1:  # low-contrast "buildings"
            d.rectangle([x, y, x + s, y + s * rng.uniform(0.5, 2)], fill=jitter(rng, tuple(top), 25))
        elif kind == 2:  # animal-like blobs: hard negatives for the animal group
            d.ellipse([x, y, x + s * 1.5, y + s], fill=jitter(rng, EARTH[rng.integers(len(EARTH))], 20))
        else:  # plain discs, never sign colours
            d.ellipse([x, y, x + s * 0.6, y + s * 0.6], fill=jitter(rng, (120, 160, 120), 40))
    return img, d


def _overlaps_too_much(box, boxes):
    """True when ``box`` (drawn on top) would hide an earlier box or nearly equal one."""
    for b in boxes:
        iw = min(box[2], b[2]) - max(box[0], b[0])
        ih = min(box[3], b[3]) - max(box[1], b[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        area_b = (b[2] - b[0]) * (b[3] - b[1])
        area = (box[2] - box[0]) * (box[3] - box[1])
        if inter / area_b > 0.55 or inter / (area + area_b - inter) > 0.45:
            return True
    return False


def _sample_box(rng, group, aspect, width, height, anchor):
    """Box [x0, y0, x1, y1] in pixels of a COCO size class drawn for ``group``."""
    size_class = rng.choice(3, p=SIZE_PROBS[group])
    s = rng.uniform(*SIZE_RANGES[size_class])
    ar = aspect * rng.uniform(0.85, 1.15)
    w, h = s * math.sqrt(ar), s / math.sqrt(ar)
    shrink = min(1.0, 0.98 * width / w, 0.98 * height / h)  # too large: fits as medium
    w, h = max(4.0, round(w * shrink)), max(4.0, round(h * shrink))
    if anchor is not None:  # persons cluster around another person
        x = anchor[0] + rng.uniform(-0.7, 0.7) * w
        y = anchor[1] + rng.uniform(-0.3, 0.3) * h
    else:
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    x, y = round(min(max(x, 0), width - w)), round(min(max(y, 0), height - h))
    return [x, y, x + w, y + h]


def _make_image(seed, split, index, image_size, categories_per_group=4):
    """Draw one image. Returns (PIL RGB image, list of (row of ``categories(categories_per_group)``,
    xyxy box))."""
    table = categories(categories_per_group)
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    span = max(1, image_size // 4)
    width, height = (int(v) for v in rng.integers(image_size, image_size + span + 1, 2))
    img, d = _background(rng, width, height)
    weights = np.array([c[3] for c in table])
    objects, persons = [], []
    for _ in range(min(10, 1 + int(rng.poisson(3.0)))):
        k = int(rng.choice(len(table), p=weights / weights.sum()))
        _, name, group, _, aspect = table[k]
        anchor = persons[int(rng.integers(len(persons)))] if group == "person" and persons \
            and rng.random() < 0.5 else None
        for _attempt in range(5):
            box = _sample_box(rng, group, aspect, width, height, anchor)
            if not _overlaps_too_much(box, [b for _, b in objects]):
                break
        else:
            continue  # no room: drop the object rather than hide another
        VARIANT_DRAW.get(name, _DRAW[group])(d, rng, box, name)
        objects.append((k, box))
        if group == "person":
            persons.append(((box[0] + box[2]) / 2, box[1]))
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0.0, rng.uniform(3.0, 14.0), arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), objects


def _write_split(root, split, num, seed, image_size, progress, categories_per_group):
    """Write ``num`` images of ``split`` and return the COCO json dict."""
    table = categories(categories_per_group)
    folder = os.path.join(root, split)
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    indices = range(num)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc=f"{split} images", unit="img")
    for i in indices:
        img, objects = _make_image(seed, split, i, image_size, categories_per_group)
        file_name = f"{i:06d}.jpg"
        img.save(os.path.join(folder, file_name), quality=92)
        images.append({"id": i + 1, "file_name": file_name, "width": img.width, "height": img.height})
        for k, (x0, y0, x1, y1) in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": table[k][0],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    info = {"description": "fqdetr built-in shapes world", "version": GENERATOR_VERSION,
            "seed": seed, "split": split, "image_size": image_size}
    if categories_per_group != 4:  # absent means 4: the default json keeps its bytes
        info["categories_per_group"] = categories_per_group
    return {
        "info": info, "licenses": [], "images": images, "annotations": annotations,
        "categories": [{"id": c[0], "name": c[1], "supercategory": c[2]} for c in table],
    }


def builtin_paths(root, split):
    """(image folder, annotation json) of ``split`` in a dataset made under ``root``."""
    return os.path.join(root, split), os.path.join(root, "annotations", f"instances_{split}.json")


def make_builtin_dataset(out_dir, num_train=2000, num_val=500, image_size=128, seed=0,
                         progress=False, categories_per_group=4):
    """Generate the built-in dataset under ``out_dir``.

    categories_per_group: 4 (16 categories) or 8 (32 categories, for finding 5 of
    docs/METHOD.md section 6); the json's ``info`` records 8 as ``categories_per_group``.

    Layout: ``out_dir/{train,val}/NNNNNN.jpg`` and
    ``out_dir/annotations/instances_{train,val}.json`` (COCO instances format, boxes
    xywh in pixels). Images are ``image_size`` to ``1.25 * image_size`` pixels a
    side. Returns {split: {"img_folder", "ann_file", "num_images", "num_annotations"}}.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    categories(categories_per_group)  # validates it before any file is written
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    out = {}
    for split, num in (("train", num_train), ("val", num_val)):
        data = _write_split(out_dir, split, num, seed, image_size, progress, categories_per_group)
        img_folder, ann_file = builtin_paths(out_dir, split)
        write_json(data, ann_file, indent=None)
        out[split] = {"img_folder": img_folder, "ann_file": ann_file,
                      "num_images": len(data["images"]), "num_annotations": len(data["annotations"])}
        log.info("%s: %d images, %d boxes -> %s", split, len(data["images"]),
                 len(data["annotations"]), ann_file)
    return out


def dataset_stats(ann):
    """Counts of a COCO json (path or dict): categories, and annotations per category, per
    supercategory and per COCO area class ("small" < 32^2 <= "medium" < 96^2 <= "large")."""
    if not isinstance(ann, dict):
        with open(ann) as f:
            ann = json.load(f)
    names = {c["id"]: (c["name"], c.get("supercategory", c["name"])) for c in ann["categories"]}
    per_cat = {n: 0 for n, _ in names.values()}
    per_super = {s: 0 for _, s in names.values()}
    sizes = {"small": 0, "medium": 0, "large": 0}
    for a in ann["annotations"]:
        name, sup = names[a["category_id"]]
        per_cat[name] += 1
        per_super[sup] += 1
        area = a["bbox"][2] * a["bbox"][3]
        sizes["small" if area < 32 ** 2 else "medium" if area < 96 ** 2 else "large"] += 1
    return {"num_images": len(ann["images"]), "num_annotations": len(ann["annotations"]),
            "num_categories": len(names), "per_category": per_cat, "per_supercategory": per_super,
            "per_size": sizes}
