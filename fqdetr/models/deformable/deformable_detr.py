"""The Deformable DETR detector (Zhu et al. 2021) and its presets.

Parameter names and shapes are those of fundamentalvision/Deformable-DETR, so its
released checkpoints (the ``model`` key) load by name. Differences from DETR: several
feature levels (ResNet layer2..4 plus strided convolutions), deformable attention, a
sigmoid classifier without a no-object class (focal loss), boxes predicted relative to
each query's reference point, and per-decoder-layer heads (``class_embed.{i}``,
``bbox_embed.{i}``: one shared module, or clones with ``with_box_refine``).
"""
import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..detr import MLP
from ..misc import NestedTensor, SampleLike, to_nested_tensor
from .backbone import MultiScaleJoiner, build_multiscale_backbone, level_mask
from .transformer import DeformableTransformer, clone_modules, inverse_sigmoid, valid_ratios_of

_GROUPS = 32  # GroupNorm groups of the input projections (official)


def _input_projections(in_channels: List[int], hidden_dim: int, num_levels: int) -> nn.ModuleList:
    """1x1 conv + GroupNorm per backbone level, then 3x3 stride-2 convs for the extra levels."""
    if hidden_dim % _GROUPS:
        raise ValueError(f"hidden_dim must be a multiple of {_GROUPS} (GroupNorm groups), got {hidden_dim}")
    projs = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(_GROUPS, hidden_dim))
             for c in in_channels]
    channels = in_channels[-1]
    for _ in range(num_levels - len(in_channels)):
        projs.append(nn.Sequential(nn.Conv2d(channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                   nn.GroupNorm(_GROUPS, hidden_dim)))
        channels = hidden_dim
    for proj in projs:
        nn.init.xavier_uniform_(proj[0].weight)
        nn.init.zeros_(proj[0].bias)
    return nn.ModuleList(projs)


class DeformableDETR(nn.Module):
    """Multi-scale backbone + deformable transformer + per-layer prediction heads.

    Input: as DETR (NestedTensor, (images, mask) pair, [B, 3, H, W] or a list of images).
    Output dict: ``pred_logits`` [B, Q, C] (sigmoid logits, no no-object column),
    ``pred_boxes`` [B, Q, 4] (cx, cy, w, h) in [0, 1]; with ``aux_loss``, ``aux_outputs``
    (one such dict per earlier decoder layer); with ``two_stage``, ``enc_outputs``
    (encoder proposals, logits [B, S, C] and boxes [B, S, 4]).
    """

    def __init__(self, backbone: MultiScaleJoiner, transformer: DeformableTransformer, num_classes: int,
                 num_queries: int, num_feature_levels: int, aux_loss: bool = True,
                 with_box_refine: bool = False, two_stage: bool = False):
        super().__init__()
        n_backbone = len(backbone.num_channels)
        if num_feature_levels < n_backbone or (n_backbone > 1) != (num_feature_levels > 1):
            raise ValueError(f"num_feature_levels={num_feature_levels} does not match a backbone with "
                             f"{n_backbone} output level(s): use 1 (layer4 only) or >= 3 (layer2..4 + extra)")
        if transformer.level_embed.shape[0] != num_feature_levels:
            raise ValueError(f"transformer has {transformer.level_embed.shape[0]} levels, the detector "
                             f"{num_feature_levels}")
        if two_stage and not with_box_refine:
            raise ValueError("two_stage requires with_box_refine (its proposals use the refinement heads)")
        self.num_queries, self.num_classes = num_queries, num_classes
        self.num_feature_levels = num_feature_levels
        self.aux_loss, self.with_box_refine, self.two_stage = aux_loss, with_box_refine, two_stage
        self.transformer = transformer
        self.backbone = backbone
        hidden_dim = transformer.d_model
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)  # (query_pos, tgt)
        self.input_proj = _input_projections(list(backbone.num_channels), hidden_dim, num_feature_levels)
        # the extra levels' stride-2 convolutions double the last backbone stride
        self.level_strides = [*backbone.strides, *(backbone.strides[-1] * 2 ** (i + 1)
                                                   for i in range(num_feature_levels - len(backbone.strides)))]
        self._build_heads(hidden_dim, num_classes, transformer.decoder.num_layers + int(two_stage))

    def _build_heads(self, hidden_dim: int, num_classes: int, num_pred: int) -> None:
        """One head per decoder layer (plus the encoder's in two-stage), official init:
        class prior 0.01, boxes start at the reference point with w = h = sigmoid(-2)."""
        class_embed = nn.Linear(hidden_dim, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        if self.with_box_refine:
            self.class_embed = clone_modules(class_embed, num_pred)
            self.bbox_embed = clone_modules(bbox_embed, num_pred)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:  # one module under every index (shared weights, each name in the state dict)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        # The first prediction has a 2-D reference point, so the head sets the size.
        nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        if self.two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for head in self.bbox_embed:  # two-stage references are boxes: predict deltas
                nn.init.zeros_(head.layers[-1].bias[2:])

    def _levels(self, samples: NestedTensor):
        """-> srcs [B, d, H_l, W_l], masks [B, H_l, W_l], pos [B, d, H_l, W_l], per level, and the
        valid ratios [B, L, 2] ("strided" level masks; None: the transformer takes them from the masks)."""
        features, pos = self.backbone(samples)
        srcs = [proj(f.tensors) for proj, f in zip(self.input_proj, features)]
        masks = [f.mask for f in features]
        mode, strides = self.backbone[0].level_masks, self.level_strides
        for level in range(len(features), self.num_feature_levels):
            src = self.input_proj[level](features[-1].tensors if level == len(features) else srcs[-1])
            mask = level_mask(samples.mask, src.shape[-2:], strides[level], mode)
            srcs.append(src)
            masks.append(mask)
            pos.append(self.backbone[1](NestedTensor(src, mask)).to(src.dtype))
        if mode == "nearest":
            return srcs, masks, pos, None
        # The image's own extent on each level, (w, h) / (stride * (W_l, H_l)); the count of valid
        # cells that the official ratios use rounds it up to whole cells (up to 64 px at stride 64).
        mask = samples.mask
        image = torch.stack([(~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)], -1).to(srcs[0].dtype)  # [B, 2] px
        # divided by each size on its own, as valid_ratios_of does: an exported graph keeps the sizes dynamic
        return srcs, masks, pos, torch.stack([torch.stack([image[:, 0] / s.shape[-1], image[:, 1] / s.shape[-2]], -1)
                                              / stride for s, stride in zip(srcs, strides)], 1)

    def _heads(self, hs: Tensor):
        """hs [L, B, Q, d] -> class logits [L, B, Q, C] and box deltas [L, B, Q, 4] of every decoder layer.

        Shared heads (no box refinement) run once on every layer's output, batch-first: a layer
        called once per forward gets one gradient per image, which the per-image Fisher squares
        (a call per decoder layer would square each layer's share separately, docs/METHOD.md 2.2).
        """
        if all(c is self.class_embed[0] for c in self.class_embed[:len(hs)]) and \
                all(b is self.bbox_embed[0] for b in self.bbox_embed[:len(hs)]):
            x = hs.transpose(0, 1)
            return self.class_embed[0](x).transpose(0, 1), self.bbox_embed[0](x).transpose(0, 1)
        return (torch.stack([self.class_embed[i](h) for i, h in enumerate(hs)]),
                torch.stack([self.bbox_embed[i](h) for i, h in enumerate(hs)]))

    def forward(self, samples: SampleLike) -> Dict[str, object]:
        samples = to_nested_tensor(samples)
        srcs, masks, pos, valid_ratios = self._levels(samples)
        query_embed = None if self.two_stage else self.query_embed.weight
        hs, init_ref, refs, enc_class, enc_coord = self.transformer(srcs, masks, pos, query_embed, valid_ratios)
        logits, deltas = self._heads(hs)
        boxes = []
        for i in range(hs.shape[0]):
            reference = inverse_sigmoid(init_ref if i == 0 else refs[i - 1])
            if reference.shape[-1] == 4:
                box = deltas[i] + reference
            else:  # 2-D reference point: it sets the centre, the head predicts the size
                box = torch.cat([deltas[i][..., :2] + reference, deltas[i][..., 2:]], -1)
            boxes.append(box.sigmoid())
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord.sigmoid()}
        return out


_OFFICIAL = dict(backbone="resnet50", backbone_width=64, dilation=False, norm="frozen", train_backbone=True,
                 trainable_layers=["layer2", "layer3", "layer4"], hidden_dim=256, nheads=8, enc_layers=6,
                 dec_layers=6, dim_feedforward=1024, dropout=0.1, num_queries=300, aux_loss=True,
                 num_feature_levels=4, enc_n_points=4, dec_n_points=4, with_box_refine=False, two_stage=False)

# Plain keyword arguments of deformable_detr_from_config; the deformable_r50* presets are
# the official models (configs/r50_deformable_detr{,_plus_iterative_bbox_refinement{,_plus_plus_two_stage}}).
DEFORMABLE_PRESETS: Dict[str, Dict[str, object]] = {
    "deformable_r50": dict(_OFFICIAL),
    "deformable_r50_box_refine": dict(_OFFICIAL, with_box_refine=True),
    "deformable_r50_two_stage": dict(_OFFICIAL, with_box_refine=True, two_stage=True),
    # From-scratch CPU model: R18 topology at 1/4 width, 2+2 layers, everything trainable; trained
    # on a fixed canvas (200 px: not a multiple of the strides 16-64), so level masks by stride.
    "deformable_tiny": dict(_OFFICIAL, backbone="resnet18", backbone_width=16, hidden_dim=64, nheads=4,
                            enc_layers=2, dec_layers=2, dim_feedforward=128, num_queries=20,
                            trainable_layers=["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"],
                            level_masks="strided"),
}


def deformable_detr_from_config(num_classes: int = 91, backbone: str = "resnet50", backbone_width: int = 64,
                                dilation: bool = False, norm: str = "frozen", train_backbone: bool = True,
                                trainable_layers=("layer2", "layer3", "layer4"), hidden_dim: int = 256,
                                nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                                dim_feedforward: int = 1024, dropout: float = 0.1, num_queries: int = 300,
                                aux_loss: bool = True, num_feature_levels: int = 4, enc_n_points: int = 4,
                                dec_n_points: int = 4, with_box_refine: bool = False,
                                two_stage: bool = False, level_masks: str = "nearest") -> DeformableDETR:
    """Build a Deformable DETR from plain keyword arguments (the official argparse names, plus
    ``level_masks``: "nearest" as the official code, "strided" for fixed-canvas training; see
    fqdetr.models.deformable.backbone.level_mask); sets ``.config`` (a plain dict, so it pickles
    under weights_only loading)."""
    config = dict(locals())
    joiner = build_multiscale_backbone(backbone, hidden_dim=hidden_dim, train_backbone=train_backbone,
                                       dilation=dilation, width=backbone_width, norm=norm,
                                       trainable_layers=trainable_layers, multi_scale=num_feature_levels > 1,
                                       level_masks=level_masks)
    transformer = DeformableTransformer(
        d_model=hidden_dim, nhead=nheads, num_encoder_layers=enc_layers, num_decoder_layers=dec_layers,
        dim_feedforward=dim_feedforward, dropout=dropout, num_feature_levels=num_feature_levels,
        enc_n_points=enc_n_points, dec_n_points=dec_n_points, two_stage=two_stage,
        two_stage_num_proposals=num_queries)
    model = DeformableDETR(joiner, transformer, num_classes=num_classes, num_queries=num_queries,
                           num_feature_levels=num_feature_levels, aux_loss=aux_loss,
                           with_box_refine=with_box_refine, two_stage=two_stage)
    model.config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    return model


def build_deformable_detr(name: str = "deformable_r50", num_classes: int = 91, **overrides) -> DeformableDETR:
    """Deformable DETR from a preset in DEFORMABLE_PRESETS, with keyword overrides."""
    if name not in DEFORMABLE_PRESETS:
        raise ValueError(f"unknown Deformable DETR preset {name!r}; choose from {sorted(DEFORMABLE_PRESETS)}")
    return deformable_detr_from_config(**{**DEFORMABLE_PRESETS[name], "num_classes": num_classes, **overrides})
