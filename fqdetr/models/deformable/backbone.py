"""Multi-scale ResNet features for Deformable DETR, reusing DETR's ResNet and encoding.

The ResNet is DETR's ``Backbone`` (same ``backbone.0.body.*`` names, frozen BN, same
trainable stages); this module only returns the outputs of ``layer2..layer4`` (strides
8, 16, 32) instead of ``layer4`` alone, each with its padding mask and sine encoding,
as the official Deformable DETR does with ``return_interm_layers``.

Each level's padding mask comes from the input's by ``level_mask``: "nearest" resizes it as the
official code does; "strided" marks the cells whose own pixels are padding, which stays aligned
on a canvas that is not a multiple of the level's stride (docs/METHOD.md section 7).
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import DETR_TRAINABLE_LAYERS, Backbone
from ..misc import NestedTensor
from ..position_encoding import PositionEmbeddingSine

_STAGES = ("layer1", "layer2", "layer3", "layer4")
LEVEL_MASKS = ("nearest", "strided")


def level_mask(mask: Tensor, size: Sequence[int], stride: int, mode: str) -> Tensor:
    """Input mask [B, H, W] (True on padding) -> the mask [B, h, w] of a level of that stride.

    "nearest": the official nearest resize to [h, w]; cell i reads pixel floor(i * H / h), which
    on a 200-px canvas at stride 64 (4 cells spanning 256 px) marks a 160-px image's padding valid.
    "strided": cell i is padding iff its first pixel i * stride is (the level has ceil(H / stride)
    cells, as a ResNet's strided convolutions give).
    """
    if mode == "nearest":
        return F.interpolate(mask[None].float(), size=tuple(size))[0].to(torch.bool)
    cells = mask[:, ::stride, ::stride]
    if tuple(cells.shape[-2:]) != tuple(size):
        raise ValueError(f"a stride-{stride} level of a {list(mask.shape[-2:])} input should have "
                         f"{list(cells.shape[-2:])} cells, the features have {list(size)}")
    return cells


class MultiScaleBackbone(Backbone):
    """ResNet returning ``return_layers`` (a suffix of layer2..layer4, or layer4 alone)."""

    def __init__(self, name: str = "resnet50", train_backbone: bool = True, dilation: bool = False,
                 width: int = 64, norm: str = "frozen", trainable_layers: Sequence[str] = DETR_TRAINABLE_LAYERS,
                 return_layers: Sequence[str] = ("layer2", "layer3", "layer4"), level_masks: str = "nearest"):
        if level_masks not in LEVEL_MASKS:
            raise ValueError(f"level_masks: expected one of {LEVEL_MASKS}, got {level_masks!r}")
        super().__init__(name, train_backbone=train_backbone, dilation=dilation, width=width, norm=norm,
                         trainable_layers=trainable_layers)
        unknown = [layer for layer in return_layers if layer not in _STAGES[1:]]
        if unknown or not return_layers:
            raise ValueError(f"return_layers must be drawn from {_STAGES[1:]}, got {list(return_layers)}")
        self.return_layers = tuple(sorted(return_layers))
        expansion = self.body.block.expansion
        self.num_channels = [width * 2 ** _STAGES.index(layer) * expansion for layer in self.return_layers]
        strides = {"layer2": 8, "layer3": 16, "layer4": 16 if dilation else 32}
        self.strides = [strides[layer] for layer in self.return_layers]
        self.level_masks = level_masks

    def forward(self, samples: NestedTensor) -> List[NestedTensor]:
        """tensors [B, 3, H, W], mask [B, H, W] -> per returned stage NestedTensor
        (features [B, C_l, h_l, w_l], mask [B, h_l, w_l])."""
        body = self.body
        x = body.maxpool(body.relu(body.bn1(body.conv1(samples.tensors))))
        out = []
        for stage in _STAGES[:_STAGES.index(self.return_layers[-1]) + 1]:
            x = getattr(body, stage)(x)
            if stage in self.return_layers:
                stride = self.strides[self.return_layers.index(stage)]
                out.append(NestedTensor(x, level_mask(samples.mask, x.shape[-2:], stride, self.level_masks)))
        return out


class MultiScaleJoiner(nn.Sequential):
    """``backbone.0`` = MultiScaleBackbone, ``backbone.1`` = sine encoding (no parameters)."""

    def __init__(self, backbone: MultiScaleBackbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.strides = backbone.strides

    def forward(self, samples: NestedTensor) -> Tuple[List[NestedTensor], List[Tensor]]:
        """-> (features per level, position encodings per level [B, d, h_l, w_l])."""
        feats = self[0](samples)
        return feats, [self[1](f).to(f.tensors.dtype) for f in feats]


def build_multiscale_backbone(name: str = "resnet50", hidden_dim: int = 256, train_backbone: bool = True,
                              dilation: bool = False, width: int = 64, norm: str = "frozen",
                              trainable_layers: Sequence[str] = DETR_TRAINABLE_LAYERS,
                              multi_scale: bool = True, level_masks: str = "nearest") -> MultiScaleJoiner:
    """ResNet returning layer2..4 (``multi_scale``) or layer4 only, plus Deformable DETR's
    sine encoding (pixel centres: offset 0.5) with hidden_dim // 2 features per axis."""
    layers = ("layer2", "layer3", "layer4") if multi_scale else ("layer4",)
    body = MultiScaleBackbone(name, train_backbone=train_backbone, dilation=dilation, width=width,
                              norm=norm, trainable_layers=trainable_layers, return_layers=layers,
                              level_masks=level_masks)
    return MultiScaleJoiner(body, PositionEmbeddingSine(hidden_dim // 2, normalize=True, offset=0.5))
