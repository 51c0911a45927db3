"""Shared set-up of the method's runs: data, criterion and objectives, evaluation."""
import logging
from pathlib import Path

from fqdetr.critical import category_sets
from fqdetr.data import CocoDetection, builtin_paths, make_builtin_dataset, make_transforms, max_size_for
from fqdetr.engine.evaluate import evaluate_model
from fqdetr.models import SetCriterion, build_criterion
from fqdetr.sensitivity import detr_objectives

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


def load_datasets(data_dir, image_size=128, num_train=400, num_val=200):
    """{"train", "val"} CocoDetection of a COCO-layout folder (DIR/{train,val}/,
    DIR/annotations/instances_{train,val}.json), resized to shorter side ``image_size``; the
    built-in dataset is generated there first when the folder has none."""
    data_dir = Path(data_dir)
    if not (data_dir / "annotations" / "instances_val.json").exists():
        log.info("generating the built-in dataset in %s (%d train / %d val images)", data_dir, num_train, num_val)
        # The generator's own image size (what the shipped model was trained on); ``image_size``
        # is the resize applied when reading.
        make_builtin_dataset(data_dir, num_train=num_train, num_val=num_val, seed=0)
    tf = make_transforms("val", scales=[image_size], max_size=max_size_for(image_size))
    return {split: CocoDetection(*builtin_paths(data_dir, split), transforms=tf) for split in ("train", "val")}


def critical_setup(model, dataset, critical="person", alpha=1.0):
    """(criterion, objectives {"overall", "critical", "mix"}, critical labels S, critical sets
    for evaluation: the chosen one plus every supercategory)."""
    cats = dataset.coco.loadCats(dataset.cat_ids)
    S = category_sets(cats, [critical])[critical]
    sets = {critical: critical}
    sets.update({s: s for s in sorted({c["supercategory"] for c in cats})})
    config = getattr(model, "config", {})
    criterion = build_criterion(model.class_embed.out_features - 1, dec_layers=config.get("dec_layers", 6),
                                aux_loss=config.get("aux_loss", True))

    def make_criterion(n):
        return SetCriterion(n, criterion.matcher, criterion.weight_dict, eos_coef=criterion.eos_coef)

    return criterion, detr_objectives(criterion, make_criterion, S, alpha=alpha), S, sets


def evaluate_splits(model, loaders, sets):
    """{split: {"mAP", "AP50", "critical": {set: AP}, "per_category": {name: AP}}}."""
    out = {}
    for split, loader in loaders.items():
        r = evaluate_model(model, loader, critical_sets=sets)["result"]
        out[split] = {"mAP": r["overall"]["AP"], "AP50": r["overall"]["AP50"],
                      "critical": {k: v["AP"] for k, v in r["critical"].items()},
                      "per_category": {k: v["AP"] for k, v in r["per_category"].items()}}
    return out
