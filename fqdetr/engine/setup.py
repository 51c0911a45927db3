"""Shared set-up of the method's runs: data, criterion and objectives, evaluation."""
import logging
from pathlib import Path
from typing import Any, NamedTuple

from fqdetr.critical import category_sets, criterion_like
from fqdetr.data import CocoDetection, make_transforms, max_size_for, resolve_dataset, train_scales
from fqdetr.engine.evaluate import evaluate_model
from fqdetr.engine.family import criterion_for
from fqdetr.sensitivity import detr_objectives, mean_objects_per_image

log = logging.getLogger(__name__)


def checkpoint_geometry(path, image_size=None, default_size=128):
    """(image_size, canvas) for running the checkpoint at ``path``: ``image_size`` when given,
    else the checkpoint's training size (``image_size``), else ``default_size``; the canvas every
    image is padded to (fqdetr.data.PadToCanvas) is the checkpoint's ``canvas``, else the
    longest side a resized image can have, max_size_for(image_size)."""
    from fqdetr.models.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    image_size = int(image_size or ckpt.get("image_size") or default_size)
    canvas = ckpt.get("canvas")
    return image_size, int(canvas) if canvas else max_size_for(image_size)


def load_datasets(data_dir, image_size=128, num_train=400, num_val=200, class_names=None, augment_train=False):
    """{"train", "val"} CocoDetection of the dataset ``data_dir`` names (fqdetr.data.resolve_dataset:
    a built-in or COCO-2017 layout folder, or ``builtin``, generated with ``num_train`` /
    ``num_val`` images when missing), resized to shorter side ``image_size``, labels in the order
    of ``class_names`` (a checkpoint's, fqdetr.data.class_names_of) when given.
    augment_train: the train split gets DETR's training transforms (random flips, shorter side
    at random among train_scales(image_size)) instead of the evaluation resize."""
    paths = resolve_dataset(data_dir, num_train=num_train, num_val=num_val)
    max_size = max_size_for(image_size)
    tf = {split: make_transforms("val", scales=[image_size], max_size=max_size) for split in paths}
    if augment_train:
        tf["train"] = make_transforms("train", scales=train_scales(image_size), max_size=max_size)
    return {split: CocoDetection(*paths[split], transforms=tf[split], class_names=class_names) for split in paths}


def critical_setup(model, dataset, critical="person", alpha=1.0, mode="lse", normalizer="fixed"):
    """(criterion, objectives {"overall", "critical", "mix"}, critical labels S, critical sets
    for evaluation: the chosen one plus every supercategory), for a DETR or a Deformable DETR.
    mode: the critical objective's (fqdetr.critical.MODES); normalizer: the per-image losses'
    (fqdetr.sensitivity.per_image), whose fixed constants are ``dataset``'s mean object counts."""
    cats = dataset.coco.loadCats(dataset.cat_ids)
    # "a+b" joins members into one set; digits are category ids (as fqdetr eval reads them).
    members = [int(m) if m.strip().isdigit() else m.strip() for m in critical.split("+")]
    S = next(iter(category_sets(cats, [members]).values()))
    sets = {critical: critical}
    sets.update({s: s for s in sorted({c["supercategory"] for c in cats})})
    criterion = criterion_for(model)  # the model family's: DETR's softmax CE or Deformable DETR's focal loss
    objectives = detr_objectives(criterion, lambda n: criterion_like(criterion, n), S, alpha=alpha, mode=mode,
                                 normalizer=normalizer, objects_per_image=mean_objects_per_image(dataset),
                                 critical_objects_per_image=mean_objects_per_image(dataset, S))
    return criterion, objectives, S, sets


def evaluate_splits(model, loaders, sets):
    """{split: {"mAP", "AP50", "critical": {set: AP}, "per_category": {name: AP}}}."""
    out = {}
    for split, loader in loaders.items():
        r = evaluate_model(model, loader, critical_sets=sets)["result"]
        out[split] = {"mAP": r["overall"]["AP"], "AP50": r["overall"]["AP50"],
                      "critical": {k: v["AP"] for k, v in r["critical"].items()},
                      "per_category": {k: v["AP"] for k, v in r["per_category"].items()}}
    return out


class Prepared(NamedTuple):
    """What ``prepare_run`` sets up for a method command (fisher, ptq, qat); ``canvas``: the
    model's padding canvas, for any further fqdetr.engine.loader.make_loader."""

    model: Any
    data: dict
    loaders: dict
    criterion: Any
    objectives: dict
    S: list
    sets: dict
    canvas: int


def prepare_run(model_path, data_dir, out_dir, image_size=None, batch_size=8, eval_images=200, critical="person",
                train_images=400, **critical_options):
    """A Prepared for a run of the checkpoint ``model_path`` on the dataset ``data_dir``
    (load_datasets; ``train_images`` generated when built-in and missing): the model in eval
    mode, datasets, evaluation loaders {"val": the whole val split, "train": its first
    ``eval_images`` images}, criterion, objectives, S, sets (critical_setup, with
    ``critical_options``: alpha, mode, normalizer) and canvas. Creates ``out_dir``. Errors name
    the command-line options (--model, --data)."""
    import torch

    from fqdetr.data import class_names_of
    from fqdetr.engine.family import num_classes_of
    from fqdetr.engine.loader import make_loader
    from fqdetr.models import load_detr_checkpoint
    from fqdetr.models.checkpoint import read_checkpoint

    if not Path(model_path).exists():
        raise FileNotFoundError(f"--model: {model_path} does not exist")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model = load_detr_checkpoint(model_path).eval()
    image_size, canvas = checkpoint_geometry(model_path, image_size)
    data = load_datasets(data_dir, image_size, max(train_images, eval_images), eval_images,
                         class_names=class_names_of(read_checkpoint(model_path)))
    if data["val"].num_classes != num_classes_of(model):
        raise ValueError(f"--data: {data_dir} has {data['val'].num_classes} categories, the model "
                         f"{model_path} {num_classes_of(model)} classes")
    train_eval = torch.utils.data.Subset(data["train"], range(min(eval_images, len(data["train"]))))
    loaders = {"val": make_loader(data["val"], batch_size, canvas, shuffle=False),
               "train": make_loader(train_eval, batch_size, canvas, shuffle=False)}
    criterion, objectives, S, sets = critical_setup(model, data["val"], critical, **critical_options)
    return Prepared(model, data, loaders, criterion, objectives, S, sets, canvas)
