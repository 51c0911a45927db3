"""Run a detector (DETR or Deformable DETR) over a loader and evaluate its detections with fqdetr.evaluation."""
from typing import Any, Dict, List

import torch
from torch import nn
from tqdm import tqdm

from fqdetr.evaluation import evaluate_detections
from fqdetr.models.box_ops import box_cxcywh_to_xyxy
from fqdetr.engine.family import class_probabilities, family_of, postprocess_for


def coco_dataset_of(loader_or_dataset):
    """The CocoDetection behind a loader / dataset / torch Subset (needs .coco and
    .label_to_cat_id)."""
    ds = getattr(loader_or_dataset, "dataset", loader_or_dataset)
    while not hasattr(ds, "coco") and hasattr(ds, "dataset"):
        ds = ds.dataset
    if not hasattr(ds, "coco") or not hasattr(ds, "label_to_cat_id"):
        raise TypeError(f"cannot find a CocoDetection behind {type(loader_or_dataset).__name__}")
    return ds


def to_coco_results(predictions: List[Dict[str, torch.Tensor]], image_ids, label_to_cat_id,
                    min_score: float = 0.0) -> List[Dict[str, Any]]:
    """Post-processed detections (xyxy pixel boxes) -> COCO result dicts (xywh, category ids)."""
    results = []
    for pred, image_id in zip(predictions, image_ids):
        boxes = pred["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        for box, score, label in zip(boxes.tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
            if score >= min_score:
                results.append({"image_id": int(image_id), "category_id": int(label_to_cat_id[label]),
                                "bbox": [round(v, 2) for v in box], "score": round(score, 5)})
    return results


@torch.no_grad()
def predict(model: nn.Module, loader, device="cpu", progress: bool = False, query_boxes: bool = False):
    """-> (the family's post-processed predictions per image, image ids, class probabilities per
    image: DETR's softmax [Q, C+1], Deformable DETR's sigmoids [Q, C]); with ``query_boxes``, also
    each image's box per query [Q, 4] (xyxy pixels), which the probabilities' rows describe."""
    model.eval()
    postprocess = postprocess_for(model)
    preds, ids, probs, boxes = [], [], [], []
    for images, mask, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        out = model((images.to(device), mask.to(device)))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        preds += [{k: v.cpu() for k, v in p.items()} for p in postprocess(out, sizes)]
        probs += list(class_probabilities(model, out["pred_logits"]).cpu())
        ids += [int(t["image_id"]) for t in targets]
        if query_boxes:
            h, w = sizes.float().unbind(1)
            scale = torch.stack([w, h, w, h], 1)[:, None, :]
            boxes += list((box_cxcywh_to_xyxy(out["pred_boxes"].float()) * scale).cpu())
    return (preds, ids, probs, boxes) if query_boxes else (preds, ids, probs)


def _ground_truth_for(coco, image_ids):
    """The gt dict restricted to ``image_ids`` (or the COCO object when it is all)."""
    wanted = set(image_ids)
    if wanted == set(coco.imgs):
        return coco
    d = coco.dataset
    return {"images": [i for i in d["images"] if i["id"] in wanted],
            "annotations": [a for a in d["annotations"] if a["image_id"] in wanted],
            "categories": list(d["categories"])}


def evaluate_model(model: nn.Module, loader, dataset=None, device="cpu", progress: bool = False,
                   critical_sets=None, transformed: bool = False) -> Dict[str, Any]:
    """Detections of ``model`` on every image of ``loader`` and their COCO evaluation.

    dataset: the CocoDetection (default: found behind the loader). When the loader
    covers only some images (a Subset), ground truth is restricted to those.
    Returns {"detections": COCO result dicts, "result": evaluate_detections(...)}.
    ``transformed=True`` also evaluates critical AP on the transformed probabilities.
    """
    was_training = model.training
    dataset = dataset if dataset is not None else coco_dataset_of(loader)
    preds, ids, probs, boxes = predict(model, loader, device, progress, query_boxes=True)
    detections = to_coco_results(preds, ids, dataset.label_to_cat_id)
    extra = {}
    if transformed:
        extra = dict(label_to_cat_id=dataset.label_to_cat_id, head=family_of(model).head, transformed_predictions=[
            {"image_id": i, "probs": p, "boxes": b} for i, p, b in zip(ids, probs, boxes)])
    result = evaluate_detections(_ground_truth_for(dataset.coco, ids), detections,
                                 critical_sets=critical_sets, **extra)
    model.train(was_training)
    return {"detections": detections, "result": result}
