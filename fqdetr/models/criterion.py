"""DETR set loss, with a per-image mode for per-sample gradients (Fisher).

DETR normalises its box losses by the number of target boxes in the batch and its
class loss by the total class weight of the batch, which couples the images of a batch
only through these constants. With ``reduction="per_image"`` every term is returned as
a [B] tensor whose image-n entry depends on image n's predictions only, divided by the
SAME batch-level normalisers, so ``per_image.sum(0)`` equals the batch loss and the
gradient of image n's entry is image n's contribution to the batch gradient.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from .matcher import HungarianMatcher

Indices = List[Tuple[Tensor, Tensor]]


def _src_permutation_idx(indices: Indices):
    """-> (batch index [N], query index [N]) of all matched predictions."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


def _per_image_sum(values: Tensor, batch_idx: Tensor, batch_size: int) -> Tensor:
    """Sum [N] matched-pair values into [B] per-image totals."""
    return values.new_zeros(batch_size).index_add(0, batch_idx.to(values.device), values)


@torch.no_grad()
def class_error(logits: Tensor, matched, target_o: Tensor, per_image: bool) -> Tensor:
    """Top-1 error (%) of the matched queries: logits [B, Q, C'], matched = (batch index
    [N], query index [N]), target_o [N] -> scalar, or [B] adding up to it per image."""
    batch_idx, src_idx = matched
    bsz = logits.shape[0]
    wrong = (logits[batch_idx, src_idx].argmax(-1) != target_o).float()
    n = max(len(target_o), 1)
    if per_image:
        err = _per_image_sum(wrong, batch_idx, bsz) * (100.0 / n)
        return err if len(target_o) else torch.full_like(err, 100.0 / bsz)
    return wrong.sum() * (100.0 / n) if len(target_o) else wrong.new_tensor(100.0)


class SetCriterion(nn.Module):
    """DETR's loss: Hungarian matching, then class CE (no-object weighted by
    ``eos_coef``), L1 and GIoU box losses on matched pairs, and the cardinality error
    (logged, no gradient); repeated on each ``aux_outputs`` entry with suffix ``_{i}``.

    ``num_classes`` excludes no-object, whose index is ``num_classes``.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float],
                 eos_coef: float = 0.1, losses: Sequence[str] = ("labels", "boxes", "cardinality")):
        super().__init__()
        unknown = set(losses) - {"labels", "boxes", "cardinality"}
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs, targets, indices: Indices, num_boxes: float, per_image: bool,
                    log: bool = True, class_normalizer: Optional[float] = None) -> Dict[str, Tensor]:
        """Weighted CE over all queries: sum_{b,q} w_t nll_{b,q} / sum_{b,q} w_t, or, per image
        with ``class_normalizer``, sum_q w_t nll_{b,q} / class_normalizer (a constant)."""
        logits = outputs["pred_logits"]  # [B, Q, C+1]
        batch_idx, src_idx = _src_permutation_idx(indices)
        target_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        target = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target[batch_idx, src_idx] = target_o
        weight = self.empty_weight.to(logits.dtype)
        if per_image:
            wnll = F.cross_entropy(logits.transpose(1, 2), target, weight, reduction="none")  # [B, Q]
            # Divide by a constant (given, else the batch's total weight), not each image's own.
            loss_ce = wnll.sum(1) / (class_normalizer or weight[target].sum())
        else:
            loss_ce = F.cross_entropy(logits.transpose(1, 2), target, weight)
        losses = {"loss_ce": loss_ce}
        if log:
            losses["class_error"] = class_error(logits, (batch_idx, src_idx), target_o, per_image)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices: Indices, num_boxes: float,
                         per_image: bool) -> Dict[str, Tensor]:
        """|number of predicted objects - number of targets|, mean over images (logging only)."""
        logits = outputs["pred_logits"]
        lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        err = (card_pred.float() - lengths.float()).abs()
        return {"cardinality_error": err / len(targets) if per_image else err.mean()}

    def loss_boxes(self, outputs, targets, indices: Indices, num_boxes: float,
                   per_image: bool) -> Dict[str, Tensor]:
        """L1 and 1 - GIoU on matched (cx, cy, w, h) boxes, summed, divided by num_boxes."""
        boxes = outputs["pred_boxes"]
        batch_idx, src_idx = _src_permutation_idx(indices)
        src = boxes[batch_idx, src_idx]  # [N, 4]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        l1 = F.l1_loss(src, tgt, reduction="none").sum(1)  # [N]
        giou = 1 - elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        if per_image:
            bsz = boxes.shape[0]
            return {"loss_bbox": _per_image_sum(l1, batch_idx, bsz) / num_boxes,
                    "loss_giou": _per_image_sum(giou, batch_idx, bsz) / num_boxes}
        return {"loss_bbox": l1.sum() / num_boxes, "loss_giou": giou.sum() / num_boxes}

    def get_loss(self, loss: str, outputs, targets, indices, num_boxes, per_image, **kwargs):
        fn = {"labels": self.loss_labels, "cardinality": self.loss_cardinality,
              "boxes": self.loss_boxes}[loss]
        return fn(outputs, targets, indices, num_boxes, per_image, **kwargs)

    @staticmethod
    def batch_num_boxes(targets: Sequence[Dict[str, Tensor]], device=None) -> float:
        """Targets per batch (averaged over processes when distributed), at least 1."""
        n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return max(float(n.item()), 1.0)

    def forward(self, outputs: Dict[str, object], targets: Sequence[Dict[str, Tensor]],
                reduction: str = "batch", num_boxes: Optional[float] = None,
                class_normalizer: Optional[float] = None) -> Dict[str, Tensor]:
        """outputs: DETR output dict (pred_logits [B, Q, C+1], pred_boxes [B, Q, 4], optional
        pred_probs for matching, optional aux_outputs); targets: B dicts (labels [n_i],
        boxes [n_i, 4] cxcywh normalised).

        Returns {name: scalar} (``reduction="batch"``) or {name: [B]} (``"per_image"``),
        the box normaliser being ``num_boxes`` when given, else the batch's target count;
        ``class_normalizer`` (per image only): the constant the class loss is divided by,
        else the batch's total class weight (docs/METHOD.md section 2.4).
        """
        if reduction not in ("batch", "per_image"):
            raise ValueError(f"reduction must be 'batch' or 'per_image', got {reduction!r}")
        per_image = reduction == "per_image"
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        if num_boxes is None:
            num_boxes = self.batch_num_boxes(targets, device=outputs["pred_logits"].device)
        losses = self._losses_for(main, targets, num_boxes, per_image, suffix="", log=True,
                                  class_normalizer=class_normalizer)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses_for(aux, targets, num_boxes, per_image, suffix=f"_{i}", log=False,
                                           class_normalizer=class_normalizer))
        return losses

    def _losses_for(self, outputs, targets, num_boxes, per_image, suffix, log, class_normalizer=None):
        indices = self.matcher(outputs, targets)
        out = {}
        for loss in self.losses:
            kwargs = {"log": log, "class_normalizer": class_normalizer} if loss == "labels" else {}
            for k, v in self.get_loss(loss, outputs, targets, indices, num_boxes, per_image, **kwargs).items():
                out[k + suffix] = v
        return out


def weighted_loss(loss_dict: Dict[str, Tensor], weight_dict: Dict[str, float]) -> Tensor:
    """sum_k weight_dict[k] * loss_dict[k] over keys in both (scalar, or [B] per image)."""
    terms = [loss_dict[k] * w for k, w in weight_dict.items() if k in loss_dict]
    if not terms:
        raise ValueError("no loss term of weight_dict is in loss_dict")
    return torch.stack(terms).sum(0)


def detr_weight_dict(dec_layers: int = 6, aux_loss: bool = True, ce: float = 1.0,
                     bbox: float = 5.0, giou: float = 2.0) -> Dict[str, float]:
    """DETR's loss weights, repeated for the dec_layers - 1 auxiliary outputs."""
    base = {"loss_ce": ce, "loss_bbox": bbox, "loss_giou": giou}
    out = dict(base)
    if aux_loss:
        for i in range(dec_layers - 1):
            out.update({f"{k}_{i}": v for k, v in base.items()})
    return out


def build_criterion(num_classes: int = 91, dec_layers: int = 6, aux_loss: bool = True,
                    eos_coef: float = 0.1, set_cost_class: float = 1.0, set_cost_bbox: float = 5.0,
                    set_cost_giou: float = 2.0, bbox_loss_coef: float = 5.0,
                    giou_loss_coef: float = 2.0) -> SetCriterion:
    """DETR's default criterion (matcher costs 1/5/2, loss weights 1/5/2, eos 0.1)."""
    matcher = HungarianMatcher(set_cost_class, set_cost_bbox, set_cost_giou)
    weights = detr_weight_dict(dec_layers, aux_loss, 1.0, bbox_loss_coef, giou_loss_coef)
    return SetCriterion(num_classes, matcher, weights, eos_coef=eos_coef)
