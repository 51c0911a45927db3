"""The DETR detector (Carion et al. 2020) and its size presets."""
from typing import Dict, List

import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Joiner, build_backbone
from .misc import SampleLike, to_nested_tensor
from .transformer import Transformer


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (names ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        """x [..., input_dim] -> [..., output_dim]."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DETR(nn.Module):
    """Backbone + transformer + prediction heads.

    Input: a NestedTensor (images [B, 3, H, W], mask [B, H, W] True on padding), an
    (images, mask) pair, an unpadded [B, 3, H, W] tensor or a list of [3, H_i, W_i].
    Output dict: ``pred_logits`` [B, Q, C+1] (last class = no object), ``pred_boxes``
    [B, Q, 4] (cx, cy, w, h) normalised to [0, 1] by a sigmoid, and with ``aux_loss``
    ``aux_outputs``: one such dict per decoder layer except the last.
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int,
                 num_queries: int, aux_loss: bool = False):
        super().__init__()
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    def forward(self, samples: SampleLike) -> Dict[str, object]:
        samples = to_nested_tensor(samples)
        features, pos = self.backbone(samples)
        src, mask = features.decompose()
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos)[0]
        # hs: [L, B, Q, d]; heads are shared across decoder layers
        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = self._aux_outputs(outputs_class, outputs_coord)
        return out

    @staticmethod
    def _aux_outputs(outputs_class: Tensor, outputs_coord: Tensor) -> List[Dict[str, Tensor]]:
        return [{"pred_logits": a, "pred_boxes": b}
                for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]


_OFFICIAL = dict(hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=2048,
                 dropout=0.1, pre_norm=False, num_queries=100, aux_loss=True,
                 backbone_width=64, dilation=False, norm="frozen", train_backbone=True,
                 trainable_layers=("layer2", "layer3", "layer4"))

# Plain keyword arguments of build_detr; "r50"/"r101" are the official DETR models.
PRESETS: Dict[str, Dict[str, object]] = {
    # From-scratch CPU model: R18 topology at 1/4 width (128 output channels), everything
    # trainable since there are no pretrained weights to preserve.
    "tiny": dict(_OFFICIAL, backbone="resnet18", backbone_width=16, hidden_dim=64, nheads=4,
                 enc_layers=2, dec_layers=2, dim_feedforward=128, num_queries=20,
                 trainable_layers=("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")),
    "r18": dict(_OFFICIAL, backbone="resnet18"),
    "r34": dict(_OFFICIAL, backbone="resnet34"),
    "r50": dict(_OFFICIAL, backbone="resnet50"),
    "r101": dict(_OFFICIAL, backbone="resnet101"),
    "r50_dc5": dict(_OFFICIAL, backbone="resnet50", dilation=True),
    "r101_dc5": dict(_OFFICIAL, backbone="resnet101", dilation=True),
}


def detr_from_config(num_classes: int = 91, backbone: str = "resnet50", backbone_width: int = 64,
                     dilation: bool = False, norm: str = "frozen", train_backbone: bool = True,
                     trainable_layers=("layer2", "layer3", "layer4"), hidden_dim: int = 256,
                     nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                     dim_feedforward: int = 2048, dropout: float = 0.1, pre_norm: bool = False,
                     num_queries: int = 100, aux_loss: bool = True) -> DETR:
    """Build a DETR from plain keyword arguments (DETR's argparse names); sets ``.config``."""
    config = dict(locals())
    joiner = build_backbone(backbone, hidden_dim=hidden_dim, train_backbone=train_backbone,
                            dilation=dilation, width=backbone_width, norm=norm,
                            trainable_layers=trainable_layers)
    transformer = Transformer(d_model=hidden_dim, nhead=nheads, num_encoder_layers=enc_layers,
                              num_decoder_layers=dec_layers, dim_feedforward=dim_feedforward,
                              dropout=dropout, normalize_before=pre_norm,
                              return_intermediate_dec=True)
    model = DETR(joiner, transformer, num_classes=num_classes, num_queries=num_queries,
                 aux_loss=aux_loss)
    # Plain dict (lists for tuples) so it pickles under torch.load(weights_only=True).
    model.config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    return model


def build_detr(name: str = "r50", num_classes: int = 91, **overrides) -> DETR:
    """DETR from a preset in PRESETS, with keyword overrides (see detr_from_config)."""
    if name not in PRESETS:
        raise ValueError(f"unknown DETR preset {name!r}; choose from {sorted(PRESETS)}")
    kwargs = {**PRESETS[name], "num_classes": num_classes, **overrides}
    return detr_from_config(**kwargs)
