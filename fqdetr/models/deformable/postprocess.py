"""Deformable DETR's top-k post-processing (COCO-style detections)."""
from typing import Dict, List

import torch
from torch import Tensor, nn

from ..box_ops import box_cxcywh_to_xyxy


class TopKPostProcess(nn.Module):
    """Per image, the ``num_select`` best (query, class) pairs by sigmoid score.

    A query can appear with several classes (the classes are independent sigmoids), as in
    the official code, which keeps 100 pairs per image.
    """

    def __init__(self, num_select: int = 100):
        super().__init__()
        if num_select < 1:
            raise ValueError(f"num_select must be >= 1, got {num_select}")
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """outputs: pred_logits [B, Q, C], pred_boxes [B, Q, 4] cxcywh in [0, 1];
        target_sizes [B, 2] (height, width) of the original images.

        Returns B dicts, best first: scores [K], labels [K] (int64), boxes [K, 4] xyxy in
        pixels, K = min(num_select, Q * C).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.dim() != 2 or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be [B, 2] (h, w), got {tuple(target_sizes.shape)}")
        if len(logits) != len(target_sizes):
            raise ValueError(f"{len(target_sizes)} target sizes for a batch of {len(logits)}")
        bsz, _, num_classes = logits.shape
        prob = logits.float().sigmoid().view(bsz, -1)
        scores, flat = torch.topk(prob, min(self.num_select, prob.shape[1]), dim=1)
        query, labels = flat // num_classes, flat % num_classes
        boxes = torch.gather(box_cxcywh_to_xyxy(boxes.float()), 1, query[..., None].expand(-1, -1, 4))
        img_h, img_w = target_sizes.to(boxes.device, torch.float32).unbind(1)
        boxes = boxes * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]

    def extra_repr(self) -> str:
        return f"num_select={self.num_select}"
