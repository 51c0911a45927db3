"""Critical AP on transformed predictions (docs/METHOD.md section 1.5).

Per query, the class probabilities are mapped to the classes of T_S (docs/METHOD.md 1.2).
Softmax heads (DETR): p [C + 1] (last column: no-object) -> [|S| + 2]: the classes of S,
"other" and no-object. With the default "lse" transform softmax(T_S(z)) is the exact
marginal of softmax(z), so p_other = sum of the non-critical class probabilities.
Sigmoid heads (Deformable DETR): p [C] independent sigmoids -> [|S| + 1]: the classes of S
and "other", with "lse" p_other = 1 - prod(1 - p_j) over the non-critical classes (the
noisy-or, the exact probability that some non-critical class is present).
With "max", p_other is (proportional to) the largest non-critical probability: only
comparisons matter here. A query is a detection of S only when its argmax over S and
"other" (no-object excluded, as in DETR's postprocess) lies in S, ties going to "other";
its score is then p_s. The full critical module (losses, targets) is ``fqdetr.critical``;
this helper only needs plain arrays.
"""
import numpy as np

from fqdetr.data.coco import load_coco
from fqdetr.evaluation.cocoeval import load_detections, resolve_critical_sets, run_cocoeval, stat_value


def _to_numpy(x):
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


HEADS = ("softmax", "sigmoid")


def _other_prob(rest_probs, other, head):
    """p_other [Q] from the non-critical class probabilities [Q, n]."""
    if rest_probs.shape[1] == 0:
        return np.zeros(len(rest_probs))
    if other == "max":
        return rest_probs.max(1)
    if other != "lse":
        raise ValueError(f"other: expected 'lse' or 'max', got {other!r}")
    if head == "sigmoid":  # 1 - prod(1 - p_j), through logs: no rounding of a product of many terms
        return -np.expm1(np.log1p(-rest_probs).sum(1))
    return rest_probs.sum(1)


def transform_probs(probs, critical_labels, other="lse", head="softmax"):
    """softmax: probs [Q, C+1] -> [Q, |S|+2]: columns S (in the given order), other, no-object.
    sigmoid: probs [Q, C] (sigmoids, no no-object column) -> [Q, |S|+1]: columns S, other."""
    if head not in HEADS:
        raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
    probs = _to_numpy(probs)
    num_classes = probs.shape[1] - (1 if head == "softmax" else 0)
    crit = np.asarray(critical_labels, dtype=np.int64)
    if crit.size == 0 or crit.min() < 0 or crit.max() >= num_classes:
        raise ValueError(f"critical labels must be non-empty and in 0..{num_classes - 1}: {crit.tolist()}")
    rest = np.setdiff1d(np.arange(num_classes), crit)
    p_other = _other_prob(probs[:, rest], other, head)
    return np.concatenate([probs[:, crit], p_other[:, None], probs[:, num_classes:]], axis=1)


def critical_queries(probs, critical_labels, other="lse", head="softmax"):
    """Which queries are detections of S after T_S (probs as ``transform_probs``).

    Returns (keep bool [Q], labels int64 [Q] original class indices, scores [Q]);
    labels and scores are meaningful where keep is True.
    """
    crit = np.asarray(critical_labels, dtype=np.int64)
    t = transform_probs(probs, crit, other, head)
    best = t[:, :len(crit)].argmax(1)
    scores = t[np.arange(len(t)), best]
    # strict: a tie (e.g. a query with all class probabilities 0) goes to "other"
    return scores > t[:, len(crit)], crit[best], scores


def transformed_detections(predictions, critical_labels, label_to_cat_id, other="lse", head="softmax"):
    """COCO result dicts of S from raw per-image predictions.

    predictions: iterable of {"image_id": int, "probs": [Q, C+1] softmax or [Q, C] sigmoid
    (``head``), "boxes": [Q, 4] xyxy in pixels of the original image, one per query} (what
    DETR's postprocess scales to; for Deformable DETR every query's box, not the top-k pairs).
    """
    dets = []
    for pred in predictions:
        keep, labels, scores = critical_queries(pred["probs"], critical_labels, other, head)
        boxes = _to_numpy(pred["boxes"])
        if boxes.shape != (len(keep), 4):
            raise ValueError(f"predictions: image {pred['image_id']} has {len(keep)} queries in 'probs' but 'boxes' "
                             f"of shape {list(boxes.shape)}; expected one xyxy box per query (not top-k pairs)")
        for q in np.flatnonzero(keep):
            x0, y0, x1, y1 = (float(v) for v in boxes[q])
            dets.append({"image_id": int(pred["image_id"]), "category_id": int(label_to_cat_id[labels[q]]),
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[q])})
    return dets


def evaluate_critical_transformed(coco_gt, predictions, critical_sets=None, label_to_cat_id=None,
                                  other="lse", head="softmax"):
    """Critical AP of each set on T_S-transformed predictions (see ``transformed_detections``).

    label_to_cat_id: class index -> COCO id (default: sorted gt category ids, as
    ``CocoDetection`` uses). Returns {set name: {"cat_ids", "AP", "AP50",
    "num_detections"}}, AP by COCOeval with params.catIds = S.
    """
    coco_gt = load_coco(coco_gt)
    predictions = list(predictions)
    label_to_cat_id = list(label_to_cat_id) if label_to_cat_id is not None else sorted(coco_gt.cats)
    cat_to_label = {c: k for k, c in enumerate(label_to_cat_id)}
    out = {}
    for name, ids in resolve_critical_sets(coco_gt, critical_sets).items():
        labels = [cat_to_label[c] for c in ids]
        dets = transformed_detections(predictions, labels, label_to_cat_id, other, head)
        E = run_cocoeval(coco_gt, load_detections(dets, coco_gt), cat_ids=ids)
        out[name] = {"cat_ids": ids, "AP": stat_value(E.stats[0]), "AP50": stat_value(E.stats[1]),
                     "num_detections": len(dets)}
    return out
