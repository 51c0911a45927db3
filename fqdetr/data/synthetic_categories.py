"""Category table of the built-in dataset at its two category counts, and the drawing
of the variants only the larger count has.

The generator (``fqdetr.data.synthetic``) draws 4 supercategories with 4 or 8 categories
each (``categories_per_group``): 16 categories, or 32 for finding 5 of docs/METHOD.md
section 6 ("the gains grow with the number of classes"). A category's rank in its group is
its COCO id's last digit (ids 1-8, 11-18, 21-28, 31-38), so the 16-category table is the
32-category one without ranks 5-8, in the same order, and the 16-category dataset is
byte-identical to the one made before the second count existed.

Ranks 5-8 of each group continue its long tail (the rarest weighs 1.0) and differ from
their siblings by a cue a detector can learn:

- ``person``: elder (grey hair, a cane beside the body), skier (skis under the whole box,
  two poles), police (navy uniform, peaked cap), runner (legs spread to the box's corners,
  arms out);
- ``vehicle``: van (one tall body with a sloped front), tractor (big rear and small front
  wheel, open cabin, exhaust), tram (longest, pantograph on the roof, bogies instead of
  round wheels), bicycle (thin ring wheels and frame, no rider, unlike ``cyclist``);
- ``animal`` (earth tones kept, so the group stays the hardest): horse (long legs, raised
  head on a neck), pig (muted pink, short legs, snout), goat (horns and a beard), deer
  (branched antlers);
- ``sign``: parking (blue upright rectangle with a white P), no-entry (red disc, white bar),
  crossing (yellow diamond with black stripes), warning (upright red-rimmed triangle with
  a black "!", where ``yield`` points down).
"""
import numpy as np

CATEGORIES_PER_GROUP = (4, 8)
# (COCO id, name, supercategory, frequency weight, box aspect ratio w/h), ordered by id.
ALL_CATEGORIES = [
    (1, "adult", "person", 30.0, 0.40), (2, "child", "person", 8.0, 0.50),
    (3, "cyclist", "person", 5.0, 0.75), (4, "worker", "person", 2.0, 0.40),
    (5, "elder", "person", 1.7, 0.55), (6, "skier", "person", 1.4, 0.75),
    (7, "police", "person", 1.2, 0.40), (8, "runner", "person", 1.0, 0.65),
    (11, "car", "vehicle", 25.0, 2.0), (12, "truck", "vehicle", 8.0, 2.6),
    (13, "bus", "vehicle", 4.0, 3.0), (14, "motorbike", "vehicle", 3.0, 1.6),
    (15, "van", "vehicle", 2.5, 1.8), (16, "tractor", "vehicle", 2.0, 1.3),
    (17, "tram", "vehicle", 1.5, 3.5), (18, "bicycle", "vehicle", 1.0, 1.7),
    (21, "dog", "animal", 10.0, 1.5), (22, "cat", "animal", 6.0, 1.4),
    (23, "cow", "animal", 3.0, 1.7), (24, "sheep", "animal", 1.5, 1.4),
    (25, "horse", "animal", 1.4, 1.2), (26, "pig", "animal", 1.25, 1.6),
    (27, "goat", "animal", 1.1, 1.2), (28, "deer", "animal", 1.0, 1.1),
    (31, "stop", "sign", 6.0, 1.0), (32, "speed", "sign", 4.0, 1.0),
    (33, "yield", "sign", 3.0, 1.1), (34, "info", "sign", 1.5, 1.0),
    (35, "parking", "sign", 1.4, 0.75), (36, "no-entry", "sign", 1.25, 1.0),
    (37, "crossing", "sign", 1.1, 1.0), (38, "warning", "sign", 1.0, 1.1),
]
EARTH = np.array([[120, 90, 60], [140, 120, 90], [100, 100, 90], [160, 140, 110]])
BLACK, WHITE, RED = (20, 20, 20), (250, 250, 250), (210, 20, 30)


def categories(categories_per_group=4):
    """The category table (rows of ALL_CATEGORIES) with ``categories_per_group`` (4 or 8)
    categories in each of the 4 supercategories."""
    if isinstance(categories_per_group, bool) or not isinstance(categories_per_group, (int, np.integer)):
        raise TypeError(f"categories_per_group must be an int (4 or 8), got "
                        f"{categories_per_group!r} ({type(categories_per_group).__name__})")
    if categories_per_group not in CATEGORIES_PER_GROUP:
        raise ValueError(f"categories_per_group must be one of {CATEGORIES_PER_GROUP}, "
                         f"got {categories_per_group}")
    return [c for c in ALL_CATEGORIES if c[0] % 10 <= categories_per_group]


def jitter(rng, colour, amount):
    """RGB tuple of ``colour`` with uniform noise of +-amount per channel."""
    c = np.asarray(colour) + rng.integers(-amount, amount + 1, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def bright(rng):
    """A random saturated colour (clothes, car paint)."""
    c = rng.integers(0, 256, 3)
    c[rng.integers(3)] = rng.integers(200, 256)
    return tuple(int(v) for v in c)


def _draw_person(d, rng, box, name):
    """Draw a elder, skier, police or runner filling the xyxy ``box``."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    # elder and skier hold a prop on the right, so the figure stands left of the box centre
    cx = x0 + w * (0.38 if name in ("elder", "skier") else 0.5)
    head, half, bottom = h * 0.2, w * (0.2 if name == "runner" else 0.26), y1 - h * 0.32
    d.ellipse([cx - head / 2, y0, cx + head / 2, y0 + head], fill=jitter(rng, (220, 180, 150), 25))
    clothes = jitter(rng, (25, 35, 95), 15) if name == "police" else bright(rng)
    d.rectangle([cx - half, y0 + head, cx + half, bottom], fill=clothes)
    legs, lw = jitter(rng, (60, 60, 90), 30), max(1, int(w * 0.1))
    feet = (x0, x1) if name == "runner" else (cx - w * 0.2, cx + w * 0.2)
    for foot in feet:
        d.line([cx, bottom, foot, y1 - (h * 0.06 if name == "skier" else 0)], fill=legs, width=lw)
    if name == "elder":  # grey hair and a hooked cane
        d.pieslice([cx - head / 2, y0, cx + head / 2, y0 + head], 180, 360, fill=(205, 205, 200))
        d.line([cx + half, y0 + h * 0.45, x1 - w * 0.06, y0 + h * 0.45, x1 - w * 0.06, y1],
               fill=(90, 60, 30), width=max(1, lw // 2))
    elif name == "police":  # peaked cap: crown and a visor wider than the head
        d.rectangle([cx - head * 0.5, y0 - 1, cx + head * 0.5, y0 + head * 0.3], fill=(15, 20, 60))
        d.line([cx - head * 0.6, y0 + head * 0.3, cx + head * 0.8, y0 + head * 0.3], fill=BLACK,
               width=max(1, int(head * 0.12)))
    elif name == "skier":  # skis across the box, poles from the hands to the snow behind
        d.line([x0, y1 - h * 0.05, x1, y1 - h * 0.01], fill=bright(rng), width=max(1, int(h * 0.04)))
        for hand in (cx - half, cx + half):
            d.line([hand, y0 + h * 0.45, hand + w * 0.3, y1 - h * 0.05], fill=BLACK, width=max(1, lw // 2))
    else:  # runner: arms swung out to both sides
        d.line([x0 + w * 0.05, y0 + h * 0.55, cx, y0 + head * 1.4, x1 - w * 0.05, y0 + h * 0.25],
               fill=clothes, width=max(1, lw // 2))


def _draw_vehicle(d, rng, box, name):
    """Draw a van, tractor, tram or bicycle filling the xyxy ``box``."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    paint, glass = bright(rng), (170, 210, 230)
    if name == "van":
        r = h * 0.2
        d.polygon([(x0, y0), (x1 - w * 0.2, y0), (x1, y0 + h * 0.45), (x1, y1 - r), (x0, y1 - r)], fill=paint)
        d.polygon([(x1 - w * 0.22, y0 + h * 0.08), (x1 - w * 0.06, y0 + h * 0.45),
                   (x1 - w * 0.22, y0 + h * 0.45)], fill=glass)
        d.line([x0 + w * 0.45, y0 + h * 0.1, x0 + w * 0.45, y1 - r], fill=BLACK, width=1)  # sliding door
        wheels = ((x0 + w * 0.2, r), (x1 - w * 0.2, r))
    elif name == "tractor":
        big, small = min(h * 0.42, w * 0.3), h * 0.2
        d.rectangle([x0 + w * 0.35, y0 + h * 0.35, x1, y1 - h * 0.3], fill=paint)  # hood
        d.rectangle([x0 + w * 0.08, y0, x0 + w * 0.5, y0 + h * 0.55], outline=paint,
                    width=max(1, int(w * 0.04)))  # open cabin frame
        d.line([x1 - w * 0.2, y0 + h * 0.35, x1 - w * 0.2, y0 + h * 0.08], fill=BLACK,
               width=max(1, int(w * 0.04)))  # exhaust
        wheels = ((x0 + big, big), (x1 - small, small))
    elif name == "tram":
        d.rectangle([x0, y0 + h * 0.2, x1, y1 - h * 0.12], fill=paint)
        for i in range(7):
            wx = x0 + w * (0.04 + 0.92 * i / 7)
            d.rectangle([wx, y0 + h * 0.3, wx + w * 0.08, y0 + h * 0.55], fill=glass)
        cx = (x0 + x1) / 2  # pantograph: a zigzag up to the contact bar
        d.line([cx - w * 0.06, y0 + h * 0.2, cx + w * 0.03, y0 + h * 0.1, cx - w * 0.02, y0],
               fill=BLACK, width=1)
        d.line([cx - w * 0.08, y0, cx + w * 0.06, y0], fill=BLACK, width=max(1, int(h * 0.05)))
        for bx in (x0 + w * 0.1, x1 - w * 0.25):  # bogies, not round wheels
            d.rectangle([bx, y1 - h * 0.12, bx + w * 0.15, y1], fill=(25, 25, 25))
        wheels = ()
    else:  # bicycle: ring wheels, thin frame, no rider
        r, lw = min(h * 0.45, w * 0.28), max(1, int(h * 0.06))
        rear, front, hub, seat = x0 + r, x1 - r, y1 - r, (x0 + w * 0.42, y0 + h * 0.25)
        for wx in (rear, front):
            d.ellipse([wx - r, y1 - 2 * r, wx + r, y1], outline=BLACK, width=lw)
        d.line([(rear, hub), seat, (x0 + w * 0.5, hub), (rear, hub)], fill=paint, width=lw)
        d.line([seat, (front - r * 0.3, y0 + h * 0.25), (front, hub)], fill=paint, width=lw)
        d.line([front - r * 0.3, y0 + h * 0.25, front - r * 0.1, y0], fill=BLACK, width=lw)  # handlebar
        wheels = ()
    for wx, r in wheels:
        d.ellipse([wx - r, y1 - 2 * r, wx + r, y1], fill=(25, 25, 25))


def _draw_animal(d, rng, box, name):
    """Draw a horse, pig, goat or deer filling the xyxy ``box``."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    colour = jitter(rng, (200, 160, 150) if name == "pig" else EARTH[rng.integers(len(EARTH))], 20)
    dark, lw = tuple(int(c * 0.6) for c in colour), max(1, int(w * 0.05))
    # body band (top, bottom) as fractions of h: the proportion cue (horse long-legged, pig low)
    top, bottom = {"horse": (0.3, 0.6), "pig": (0.3, 0.85), "goat": (0.35, 0.7), "deer": (0.4, 0.7)}[name]
    for fx in (0.2, 0.35, 0.6, 0.75):
        d.line([x0 + w * fx, y0 + h * (top + bottom) / 2, x0 + w * fx, y1], fill=dark, width=lw)
    d.ellipse([x0 + w * 0.05, y0 + h * top, x0 + w * 0.8, y0 + h * bottom], fill=colour)
    hs = h * (0.35 if name == "pig" else 0.28)
    hy = y0 + h * (0.35 if name == "pig" else 0.05 if name == "horse" else 0.2)
    if name == "horse":  # neck up to the raised head, tail behind
        d.line([x0 + w * 0.7, y0 + h * 0.4, x1 - hs * 0.5, hy + hs * 0.5], fill=colour,
               width=max(1, int(w * 0.1)))
        d.line([x0 + w * 0.06, y0 + h * 0.4, x0, y0 + h * 0.75], fill=dark, width=lw)
    d.ellipse([x1 - hs, hy, x1, hy + hs], fill=colour)
    if name == "pig":  # snout at the front of the head
        d.ellipse([x1 - hs * 0.35, hy + hs * 0.35, x1, hy + hs * 0.75], fill=(230, 170, 170))
    elif name == "goat":  # short horns swept back, beard under the chin
        d.line([x1 - hs * 0.3, hy + hs * 0.1, x1 - hs * 0.7, hy - hs * 0.5], fill=dark, width=lw)
        d.polygon([(x1 - hs * 0.5, hy + hs * 0.9), (x1 - hs * 0.2, hy + hs * 0.9),
                   (x1 - hs * 0.4, hy + hs * 1.5)], fill=dark)
    elif name == "deer":  # branched antlers up to the box top
        for side in (-0.25, 0.25):
            bx = x1 - hs * (0.5 + side)
            d.line([bx, hy + hs * 0.2, bx - w * 0.06, y0], fill=dark, width=lw)
            d.line([bx - w * 0.03, (y0 + hy) / 2, bx + w * 0.04, y0 + (hy - y0) * 0.2], fill=dark, width=lw)


def _draw_sign(d, rng, box, name):
    """Draw a parking, no-entry, crossing or warning filling the xyxy ``box``."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if name == "parking":  # blue upright rectangle, white P (a bar and a ring)
        stroke = max(1, int(w * 0.12))
        d.rectangle([x0, y0, x1, y1], fill=(20, 70, 200))
        d.rectangle([x0 + w * 0.28, y0 + h * 0.18, x0 + w * 0.28 + stroke, y1 - h * 0.18], fill=WHITE)
        d.ellipse([x0 + w * 0.28, y0 + h * 0.18, x1 - w * 0.22, y0 + h * 0.5], outline=WHITE, width=stroke)
    elif name == "no-entry":  # red disc, white bar
        d.ellipse([x0, y0, x1, y1], fill=RED)
        d.rectangle([x0 + w * 0.18, cy - h * 0.1, x1 - w * 0.18, cy + h * 0.1], fill=WHITE)
    elif name == "crossing":  # yellow diamond, black zebra stripes
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=(250, 200, 0), outline=BLACK)
        for i in range(3):
            sx = cx - w * 0.25 + i * w * 0.18
            d.rectangle([sx, cy - h * 0.02, sx + w * 0.1, cy + h * 0.2], fill=BLACK)
    else:  # warning: upright triangle (yield points down), red rim, black "!"
        rim = max(1, int(min(w, h) * 0.12))
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=RED)
        d.polygon([(cx, y0 + rim * 2), (x1 - rim * 1.7, y1 - rim), (x0 + rim * 1.7, y1 - rim)], fill=WHITE)
        d.rectangle([cx - w * 0.04, y0 + h * 0.35, cx + w * 0.04, y0 + h * 0.68], fill=BLACK)
        d.rectangle([cx - w * 0.04, y0 + h * 0.74, cx + w * 0.04, y0 + h * 0.82], fill=BLACK)


_GROUP_DRAW = {"person": _draw_person, "vehicle": _draw_vehicle, "animal": _draw_animal, "sign": _draw_sign}
# name -> drawer(draw, rng, xyxy box, name) of the ranks 5-8 only; ranks 1-4 are drawn by
# fqdetr.data.synthetic, unchanged so the 16-category images keep their bytes.
VARIANT_DRAW = {c[1]: _GROUP_DRAW[c[2]] for c in ALL_CATEGORIES if c[0] % 10 > 4}
