"""Datasets: COCO-format reading, DETR transforms, and the built-in generated dataset.

This package knows no model: it yields images and DETR-style targets.
"""
from fqdetr.data.coco import CocoDetection, class_names_of, load_coco
from fqdetr.data.layout import BUILTIN, resolve_dataset
from fqdetr.data.synthetic import builtin_paths, dataset_stats, make_builtin_dataset
from fqdetr.data.transforms import PadToCanvas, make_transforms, max_size_for, train_scales

__all__ = ["CocoDetection", "class_names_of", "load_coco", "BUILTIN", "resolve_dataset",
           "make_builtin_dataset",
           "builtin_paths", "dataset_stats", "make_transforms", "max_size_for", "train_scales", "PadToCanvas"]
