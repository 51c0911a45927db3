"""Hungarian matching between DETR predictions and ground-truth objects."""
from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising, per image,

        cost = cost_class * (-p[target class]) + cost_bbox * L1(boxes) + cost_giou * (-GIoU)

    Class probabilities are ``softmax(pred_logits)`` unless ``outputs`` carries
    ``pred_probs`` [B, Q, C'] (e.g. probabilities after a label transformation), which
    are then used as they are. Queries left unmatched are "no object".
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    def class_costs(self, outputs: Dict[str, Tensor]) -> Tensor:
        """-> [B*Q, C'] fp32 cost of giving each query each class: -probability (a subclass
        may score classes differently, e.g. with a focal cost)."""
        if "pred_probs" in outputs:
            prob = outputs["pred_probs"].flatten(0, 1)
        else:
            prob = outputs["pred_logits"].flatten(0, 1).softmax(-1)
        return -prob.float()

    @torch.no_grad()
    def cost_matrices(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> List[Tensor]:
        """-> list over images of cost matrices [Q, n_i] (fp32, on CPU)."""
        bs, nq = outputs["pred_boxes"].shape[:2]
        class_costs = self.class_costs(outputs)                       # [B*Q, C']
        boxes = outputs["pred_boxes"].flatten(0, 1).float()          # [B*Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets]).to(class_costs.device).long()
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes.device).float()  # [N, 4]
        # The whole batch in one matrix [B*Q, N] (cheap), then split per image.
        cost_class = class_costs[:, tgt_ids]
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        c = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        c = c.view(bs, nq, -1).cpu()
        if not bool(torch.isfinite(c).all()):
            raise ValueError("HungarianMatcher: non-finite matching cost (NaN/inf in predictions)")
        sizes = [len(t["boxes"]) for t in targets]
        return [m[i] for i, m in enumerate(c.split(sizes, -1))]

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor],
                targets: Sequence[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """outputs: pred_logits [B, Q, C+1] (or pred_probs), pred_boxes [B, Q, 4] cxcywh;
        targets: B dicts with labels [n_i] and boxes [n_i, 4] cxcywh.

        Returns B pairs (query indices, target indices), int64 [min(Q, n_i)] each, sorted
        by query index.
        """
        if len(targets) != outputs["pred_boxes"].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs['pred_boxes'].shape[0]}")
        result = []
        for c in self.cost_matrices(outputs, targets):
            rows, cols = linear_sum_assignment(c.numpy())
            result.append((torch.as_tensor(rows, dtype=torch.int64),
                           torch.as_tensor(cols, dtype=torch.int64)))
        return result

    def extra_repr(self) -> str:
        return f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}"
