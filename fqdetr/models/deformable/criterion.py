"""Deformable DETR's set loss: sigmoid focal classification, DETR's box losses.

Differences from DETR's ``SetCriterion`` (whose matching, box losses, per-image mode
and auxiliary handling are reused): classes are independent sigmoids without a
no-object column, scored by the focal loss (alpha 0.25, gamma 2) in the loss and in the
matching cost; in two-stage, the encoder proposals (``enc_outputs``) are matched to
class-agnostic targets and add ``*_enc`` terms. As in DETR, ``reduction="per_image"``
returns [B] terms that sum to the batch loss (normalisers stay batch constants).
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..criterion import Indices, SetCriterion, _src_permutation_idx, class_error
from ..matcher import HungarianMatcher


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017) of independent sigmoids, elementwise.

    logits, targets [...] (targets 0/1) -> [...]: alpha_t (1 - p_t)^gamma BCE(logits, targets).
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


class FocalHungarianMatcher(HungarianMatcher):
    """Hungarian matching with the focal class cost of Deformable DETR:
    cost(q, c) = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p)), p = sigmoid."""

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__(cost_class, cost_bbox, cost_giou)
        self.alpha, self.gamma = alpha, gamma

    def class_costs(self, outputs: Dict[str, Tensor]) -> Tensor:
        """pred_logits [B, Q, C] -> [B*Q, C] fp32 focal costs."""
        prob = outputs["pred_logits"].flatten(0, 1).float().sigmoid()
        eps = 1e-8  # as the official cost: log stays finite at p = 0 or 1
        neg = (1 - self.alpha) * prob ** self.gamma * -(1 - prob + eps).log()
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + eps).log()
        return pos - neg


class DeformableSetCriterion(SetCriterion):
    """Focal-loss set criterion. ``num_classes`` is the number of sigmoid outputs (no
    no-object class). Loss keys as DETR's plus ``*_enc`` for two-stage encoder outputs.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float],
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 losses: Sequence[str] = ("labels", "boxes", "cardinality")):
        super().__init__(num_classes, matcher, weight_dict, losses=losses)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.class_weight: Optional[Tensor] = None  # [C] focal-loss weight per class (None: all 1)

    def loss_labels(self, outputs, targets, indices: Indices, num_boxes: float, per_image: bool,
                    log: bool = True, class_normalizer: Optional[float] = None) -> Dict[str, Tensor]:
        """Focal loss summed over queries and classes, divided by num_boxes (the official
        ``mean(1).sum() / num_boxes * Q``); ``class_normalizer`` is unused: the focal loss
        has DETR's box normaliser."""
        logits = outputs["pred_logits"]  # [B, Q, C]
        matched = _src_permutation_idx(indices)
        target_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot = torch.zeros_like(logits)
        onehot[matched[0], matched[1], target_o.long()] = 1.0
        focal = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma)
        if self.class_weight is not None:
            focal = focal * self.class_weight.to(focal)
        loss_ce = (focal.sum((1, 2)) if per_image else focal.sum()) / num_boxes
        losses = {"loss_ce": loss_ce}
        if log:
            losses["class_error"] = class_error(logits, matched, target_o, per_image)
        return losses

    def forward(self, outputs: Dict[str, object], targets: Sequence[Dict[str, Tensor]],
                reduction: str = "batch", num_boxes: Optional[float] = None,
                class_normalizer: Optional[float] = None) -> Dict[str, Tensor]:
        """outputs: DeformableDETR output dict (pred_logits [B, Q, C], pred_boxes [B, Q, 4],
        optional aux_outputs and enc_outputs); targets: B dicts (labels [n_i], boxes [n_i, 4]
        cxcywh normalised). Returns {name: scalar} or, ``"per_image"``, {name: [B]}.
        ``class_normalizer`` is accepted for SetCriterion's signature and unused."""
        decoder_outputs = {k: v for k, v in outputs.items() if k != "enc_outputs"}
        if num_boxes is None:
            num_boxes = self.batch_num_boxes(targets, device=outputs["pred_logits"].device)
        losses = super().forward(decoder_outputs, targets, reduction, num_boxes, class_normalizer)
        if "enc_outputs" in outputs:
            # proposals are class-agnostic: every target is class 0 ("object")
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._losses_for(outputs["enc_outputs"], binary, num_boxes,
                                           reduction == "per_image", suffix="_enc", log=False))
        return losses


def deformable_weight_dict(dec_layers: int = 6, aux_loss: bool = True, two_stage: bool = False,
                           ce: float = 2.0, bbox: float = 5.0, giou: float = 2.0) -> Dict[str, float]:
    """Deformable DETR's loss weights (class 2, L1 5, GIoU 2), repeated for the auxiliary
    decoder outputs (``_{i}``) and, two-stage, the encoder proposals (``_enc``)."""
    base = {"loss_ce": ce, "loss_bbox": bbox, "loss_giou": giou}
    out = dict(base)
    suffixes = [f"_{i}" for i in range(dec_layers - 1)] if aux_loss else []
    suffixes += ["_enc"] if two_stage else []
    for suffix in suffixes:
        out.update({k + suffix: v for k, v in base.items()})
    return out


def build_deformable_criterion(num_classes: int = 91, dec_layers: int = 6, aux_loss: bool = True,
                               two_stage: bool = False, set_cost_class: float = 2.0,
                               set_cost_bbox: float = 5.0, set_cost_giou: float = 2.0,
                               cls_loss_coef: float = 2.0, bbox_loss_coef: float = 5.0,
                               giou_loss_coef: float = 2.0, focal_alpha: float = 0.25) -> DeformableSetCriterion:
    """The official criterion: focal matching costs 2/5/2, loss weights 2/5/2, alpha 0.25."""
    matcher = FocalHungarianMatcher(set_cost_class, set_cost_bbox, set_cost_giou, alpha=focal_alpha)
    weights = deformable_weight_dict(dec_layers, aux_loss, two_stage, cls_loss_coef, bbox_loss_coef,
                                     giou_loss_coef)
    return DeformableSetCriterion(num_classes, matcher, weights, focal_alpha=focal_alpha)
