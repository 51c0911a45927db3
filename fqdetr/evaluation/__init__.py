"""COCO evaluation: overall, per-category and critical-set AP, and reports.

- ``evaluate_detections``: pycocotools COCOeval on COCO-format detections;
  critical sets evaluated with ``params.catIds`` restricted (docs/METHOD.md section 1.5).
- ``evaluate_critical_transformed``: critical AP on T_S-transformed raw predictions.
- ``write_report``: report.json, report.md, per-category AP bar charts.
"""
from fqdetr.evaluation.cocoeval import (STAT_NAMES, load_detections, per_category_ap, resolve_critical_sets,
                                        run_cocoeval)
from fqdetr.evaluation.detections import evaluate_detections
from fqdetr.evaluation.report import format_ap, plot_per_category, render_markdown, write_report
from fqdetr.evaluation.transformed import (critical_queries, evaluate_critical_transformed,
                                           transform_probs, transformed_detections)

__all__ = ["STAT_NAMES", "evaluate_detections", "load_detections", "per_category_ap",
           "resolve_critical_sets", "run_cocoeval", "format_ap", "plot_per_category", "render_markdown",
           "write_report", "critical_queries", "evaluate_critical_transformed",
           "transform_probs", "transformed_detections"]
