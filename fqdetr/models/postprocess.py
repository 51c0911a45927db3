"""Convert DETR outputs to COCO-style detections."""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Per image: every query becomes a detection with its best real class.

    scores/labels come from softmax over all classes, then the max over real classes
    (the no-object column, last, is dropped, as DETR); boxes become absolute xyxy pixels.
    """

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """outputs: pred_logits [B, Q, C+1], pred_boxes [B, Q, 4] cxcywh in [0, 1];
        target_sizes: [B, 2] (height, width) of the original images.

        Returns B dicts: scores [Q], labels [Q] (int64), boxes [Q, 4] xyxy in pixels.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.dim() != 2 or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be [B, 2] (h, w), got {tuple(target_sizes.shape)}")
        if len(logits) != len(target_sizes):
            raise ValueError(f"{len(target_sizes)} target sizes for a batch of {len(logits)}")
        prob = F.softmax(logits.float(), -1)
        scores, labels = prob[..., :-1].max(-1)
        img_h, img_w = target_sizes.to(boxes.device, torch.float32).unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # [B, 4]
        boxes = box_cxcywh_to_xyxy(boxes.float()) * scale[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
