"""The full evaluation of COCO-format detections: overall, per-category and critical-set AP
(docs/METHOD.md section 1.5), optionally critical AP on T_S-transformed predictions."""
import logging

from fqdetr.data.coco import load_coco
from fqdetr.evaluation.cocoeval import (STAT_NAMES, load_detections, per_category_ap, resolve_critical_sets,
                                        run_cocoeval, stat_value)
from fqdetr.evaluation.report import format_ap
from fqdetr.evaluation.transformed import evaluate_critical_transformed

log = logging.getLogger(__name__)


def evaluate_detections(coco_gt, detections, critical_sets=None, transformed_predictions=None,
                        label_to_cat_id=None, other="lse", head="softmax"):
    """Evaluate COCO-format detections against ground truth.

    coco_gt: COCO, gt json path or dict. detections: list of result dicts or a json
    path. critical_sets: see resolve_critical_sets (default: every supercategory).
    transformed_predictions: optional per-image raw predictions, see
    ``evaluate_critical_transformed`` (``head``: "softmax" or "sigmoid" probabilities);
    adds "critical_transformed" to the result.

    Returns {"overall": {STAT_NAMES: value}, "per_category": {name: {"id",
    "supercategory", "num_gt", "AP", "AP50"}}, "critical": {set name: {"cat_ids",
    "categories", "AP", "AP50"}}, "num_images", "num_detections"}.
    """
    coco_gt = load_coco(coco_gt)
    coco_dt = load_detections(detections, coco_gt)
    E = run_cocoeval(coco_gt, coco_dt)
    result = {"overall": {n: stat_value(v) for n, v in zip(STAT_NAMES, E.stats)},
              "per_category": {}, "critical": {},
              "num_images": len(coco_gt.imgs), "num_detections": len(coco_dt.anns)}
    for cat_id, (ap, ap50) in per_category_ap(E).items():
        cat = coco_gt.cats[cat_id]
        result["per_category"][cat["name"]] = {
            "id": cat_id, "supercategory": cat.get("supercategory") or cat["name"],
            "num_gt": len(coco_gt.getAnnIds(catIds=[cat_id], iscrowd=False)), "AP": ap, "AP50": ap50}
    for name, ids in resolve_critical_sets(coco_gt, critical_sets).items():
        Ec = run_cocoeval(coco_gt, coco_dt, cat_ids=ids)
        result["critical"][name] = {"cat_ids": ids, "categories": [coco_gt.cats[c]["name"] for c in ids],
                                    "AP": stat_value(Ec.stats[0]), "AP50": stat_value(Ec.stats[1])}
    if transformed_predictions is not None:
        result["critical_transformed"] = evaluate_critical_transformed(
            coco_gt, transformed_predictions, critical_sets, label_to_cat_id, other, head)
    _log_summary(result)
    return result


def _log_summary(result):
    o = result["overall"]
    log.info("mAP %s  AP50 %s  AP75 %s  (%d images, %d detections)", format_ap(o["AP"]), format_ap(o["AP50"]),
             format_ap(o["AP75"]), result["num_images"], result["num_detections"])
    for name, r in result["critical"].items():
        log.info("critical %-12s AP %s  AP50 %s", name, format_ap(r["AP"]), format_ap(r["AP50"]))
