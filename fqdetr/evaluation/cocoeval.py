"""COCO box evaluation pieces over pycocotools: critical sets, detections, COCOeval runs and
per-category AP (fqdetr.evaluation.detections puts them together).

A critical set S (docs/METHOD.md section 1.5) is evaluated by COCOeval itself with
``params.catIds = S`` -- AP@[.5:.95] and AP50 averaged over the classes of S.
Values that COCO leaves undefined (e.g. a category with no ground truth) are None,
so results stay valid JSON.
"""
import contextlib
import io
import json
import math
import os

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fqdetr.data.coco import load_coco

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@contextlib.contextmanager
def quiet():
    """Swallow pycocotools' prints (it reports on stdout); we log summaries instead."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def stat_value(x):
    """float, or None for COCO's "undefined" (-1) and NaN."""
    x = float(x)
    return None if (x < 0 or math.isnan(x)) else x


def _resolve_member(coco_gt, member):
    """Category ids named by one member: a supercategory name, a category name or id."""
    if isinstance(member, (int, np.integer)) or (isinstance(member, str) and member.isdigit()):
        if int(member) not in coco_gt.cats:
            raise ValueError(f"critical set: unknown category id {member}")
        return [int(member)]
    ids = [c for c, cat in coco_gt.cats.items() if cat.get("supercategory") == member]
    ids = ids or [c for c, cat in coco_gt.cats.items() if cat["name"] == member]
    if not ids:
        sups = sorted({cat.get("supercategory", "") for cat in coco_gt.cats.values()})
        raise ValueError(f"critical set: {member!r} is neither a supercategory {sups} "
                         f"nor a category name of the ground truth")
    return ids


def resolve_critical_sets(coco_gt, critical_sets=None):
    """{set name: sorted category ids}.

    ``critical_sets``: None (every supercategory of the gt categories, in order of
    first appearance); a dict {name: members}; or a list whose items are a member
    or a list of members. A member is a supercategory name, a category name or a
    category id; the string "a+b" is the union of members a and b.
    """
    coco_gt = load_coco(coco_gt)
    if critical_sets is None:
        critical_sets = []
        for c in sorted(coco_gt.cats):
            sup = coco_gt.cats[c].get("supercategory") or coco_gt.cats[c]["name"]
            if sup not in critical_sets:
                critical_sets.append(sup)
    if not isinstance(critical_sets, dict):
        named = {}
        for item in critical_sets:
            members = item if isinstance(item, (list, tuple, set)) else [item]
            named["+".join(str(m) for m in members)] = members
        critical_sets = named
    out = {}
    for name, members in critical_sets.items():
        if isinstance(members, (str, int, np.integer)):
            members = [members]
        ids = set()
        for m in members:
            for part in (m.split("+") if isinstance(m, str) else [m]):
                ids.update(_resolve_member(coco_gt, part.strip() if isinstance(part, str) else part))
        out[str(name)] = sorted(ids)
    return out


def _check_detections(coco_gt, detections):
    """Raise ValueError naming the first malformed detection."""
    if not isinstance(detections, (list, tuple)):
        raise ValueError(f"detections must be a list of dicts, got {type(detections).__name__}")
    for i, d in enumerate(detections):
        if not isinstance(d, dict) or any(k not in d for k in ("image_id", "category_id", "bbox", "score")):
            raise ValueError(f"detection {i} must have image_id, category_id, bbox, score: {d!r}")
        if d["image_id"] not in coco_gt.imgs:
            raise ValueError(f"detection {i}: image_id {d['image_id']} is not in the ground truth")
        if d["category_id"] not in coco_gt.cats:
            raise ValueError(f"detection {i}: category_id {d['category_id']} is not in the ground truth")
        b = d["bbox"]
        if len(b) != 4 or not all(np.isfinite(float(v)) for v in b) or not np.isfinite(float(d["score"])):
            raise ValueError(f"detection {i}: bbox must be 4 finite numbers [x, y, w, h] and "
                             f"score finite, got {b!r}, {d['score']!r}")


def load_detections(detections, coco_gt):
    """pycocotools results COCO from a list of result dicts or a json path.

    Result dicts: {"image_id", "category_id", "bbox": [x, y, w, h] pixels, "score"}.
    An empty list gives an empty results set (every AP is then 0), which
    ``COCO.loadRes`` itself cannot build.
    """
    if isinstance(detections, (str, os.PathLike)):
        path = os.fspath(detections)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"detections file not found: {path}")
        try:
            with open(path) as f:
                detections = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from err
    _check_detections(coco_gt, detections)
    if not detections:
        empty = COCO()
        empty.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                         "categories": list(coco_gt.dataset["categories"])}
        with quiet():
            empty.createIndex()
        return empty
    # loadRes writes ids and areas into the dicts: give it copies.
    dets = [{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in detections]
    for d in dets:
        d["bbox"] = [float(v) for v in d["bbox"]]
        d["score"] = float(d["score"])
    with quiet():
        return coco_gt.loadRes(dets)


def run_cocoeval(coco_gt, coco_dt, cat_ids=None):
    """Evaluated, accumulated and summarised COCOeval (bbox), optionally restricted
    to ``cat_ids``. ``E.stats`` holds the 12 numbers of STAT_NAMES."""
    E = COCOeval(coco_gt, coco_dt, "bbox")
    if cat_ids is not None:
        E.params.catIds = sorted(cat_ids)
    with quiet():
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E


def per_category_ap(E):
    """{category id: (AP@[.5:.95], AP50)} from E.eval["precision"] [T, R, K, A, M],
    averaged over entries > -1 at area "all" and the largest maxDets, as summarize()."""
    precision = E.eval["precision"]
    out = {}
    for k, cat_id in enumerate(E.params.catIds):
        p = precision[:, :, k, 0, -1]
        p50 = precision[0, :, k, 0, -1]
        ap = float(np.mean(p[p > -1])) if (p > -1).any() else None
        ap50 = float(np.mean(p50[p50 > -1])) if (p50 > -1).any() else None
        out[int(cat_id)] = (ap, ap50)
    return out


def evaluate_images(coco_gt, coco_dt, cat_ids=None):
    """COCOeval (bbox) after evaluate() only: its per-image matches ``evalImgs``, which
    fqdetr.stats accumulates with image weights (bootstrap resamples)."""
    E = COCOeval(coco_gt, coco_dt, "bbox")
    if cat_ids is not None:
        E.params.catIds = sorted(cat_ids)
    with quiet():
        E.evaluate()
    return E
