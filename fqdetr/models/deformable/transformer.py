"""Deformable DETR's encoder-decoder, on batch-first tensors [B, S, d].

The encoder replaces self-attention by multi-scale deformable attention over all
feature levels (concatenated row-major, level after level); the decoder keeps standard
query self-attention (``nn.MultiheadAttention``, packed ``in_proj_weight``) and
cross-attends to the memory with deformable attention around each query's reference
point. Names follow fundamentalvision/Deformable-DETR (``encoder.layers.{i}.self_attn``,
``decoder.layers.{i}.{cross_attn,self_attn}``, ``level_embed``, ``reference_points`` or,
two-stage, ``enc_output``/``pos_trans``) so its checkpoints load by name.

Box refinement and two-stage reuse the detector's prediction heads inside the decoder;
the detector hands them over as ``decoder.bbox_embed`` / ``decoder.class_embed`` (then
they also appear under ``transformer.decoder.*`` in the state dict, as officially).
"""
import copy
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ms_deform_attn import MSDeformAttn, SpatialShapes


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), with x clamped to [eps, 1 - eps] so it stays finite (the official eps)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def clone_modules(module: nn.Module, n: int) -> nn.ModuleList:
    """n independent deep copies (ModuleList names .0 .. .n-1)."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _residual_ffn(layer: nn.Module, x: Tensor, dropout_inner: nn.Module, dropout_out: nn.Module,
                  norm: nn.Module) -> Tensor:
    """x [B, S, d] -> norm(x + dropout(linear2(dropout(relu(linear1(x)))))), with the
    layer's own ``linear1``/``linear2`` (the official names)."""
    return norm(x + dropout_out(layer.linear2(dropout_inner(F.relu(layer.linear1(x))))))


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then FFN (post-norm)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: SpatialShapes,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """src, pos [B, S, d]; reference_points [B, S, L, 2]; padding_mask [B, S] -> [B, S, d]."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        return _residual_ffn(self, src, self.dropout2, self.dropout3, self.norm2)


class DeformableDecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention to the memory, FFN (post-norm)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: SpatialShapes, padding_mask: Optional[Tensor] = None) -> Tensor:
        """tgt, query_pos [B, Q, d]; reference_points [B, Q, L, 2 or 4]; memory [B, S, d];
        padding_mask [B, S] -> [B, Q, d]."""
        q = (tgt + query_pos).transpose(0, 1)  # nn.MultiheadAttention is sequence-first
        attn = self.self_attn(q, q, tgt.transpose(0, 1))[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(attn))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attn))
        return _residual_ffn(self, tgt, self.dropout3, self.dropout4, self.norm3)


def encoder_reference_points(spatial_shapes: SpatialShapes, valid_ratios: Tensor) -> Tensor:
    """Pixel centres of every level as reference points for the encoder.

    valid_ratios [B, L, 2] (valid width, height fractions) -> [B, S, L, 2]: each centre
    normalised by its image's valid size, then scaled into every level's padded frame.
    """
    points = []
    for level, (h, w) in enumerate(spatial_shapes):
        # arange + 0.5 (= linspace(0.5, h - 0.5, h)) exports with a traced h as a dynamic Range
        ys = torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
        xs = torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    """A stack of encoder layers sharing one set of reference points."""

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = clone_modules(layer, num_layers)
        self.num_layers = num_layers

    def forward(self, src: Tensor, spatial_shapes: SpatialShapes, valid_ratios: Tensor, pos: Tensor,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """src, pos [B, S, d]; valid_ratios [B, L, 2]; padding_mask [B, S] -> memory [B, S, d]."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, padding_mask)
        return out


class DeformableDecoder(nn.Module):
    """A stack of decoder layers returning every layer's output and reference points.

    With ``bbox_embed`` set (box refinement), each layer's box prediction, added in
    logit space, becomes the next layer's reference box (detached, as officially).
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = clone_modules(layer, num_layers)
        self.num_layers = num_layers
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.class_embed: Optional[nn.ModuleList] = None

    def forward(self, tgt: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: SpatialShapes,
                valid_ratios: Tensor, query_pos: Tensor,
                padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """tgt, query_pos [B, Q, d]; reference_points [B, Q, 2 or 4] in [0, 1] of the valid
        image; memory [B, S, d]; valid_ratios [B, L, 2]
        -> (hs [n_layers, B, Q, d], references [n_layers, B, Q, 2 or 4])."""
        out, outputs, references = tgt, [], []
        for i, layer in enumerate(self.layers):
            # valid-image coordinates -> each level's padded frame
            scale = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios] * 2, -1)
            out = layer(out, query_pos, reference_points[:, :, None] * scale[:, None], memory,
                        spatial_shapes, padding_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[i](out)
                logit = inverse_sigmoid(reference_points)
                if reference_points.shape[-1] == 2:
                    refined = torch.cat([delta[..., :2] + logit, delta[..., 2:]], -1)
                else:
                    refined = delta + logit
                reference_points = refined.sigmoid().detach()
            outputs.append(out)
            references.append(reference_points)
        return torch.stack(outputs), torch.stack(references)


def valid_ratios_of(mask: Tensor) -> Tensor:
    """mask [B, H, W] True on padding -> [B, 2] valid (width, height) fractions."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(torch.float32) / h
    valid_w = (~mask[:, 0, :]).sum(1).to(torch.float32) / w
    return torch.stack([valid_w, valid_h], -1)


def proposal_pos_embed(proposals: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of box logits: [B, Q, 4] -> [B, Q, 4 * num_pos_feats] (official:
    128 features for d_model 256, i.e. d_model // 2)."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = proposals.float().sigmoid()[..., None] * (2 * math.pi) / dim_t  # [B, Q, 4, F], fp32 as officially
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2).to(proposals.dtype)


def encoder_proposals(memory: Tensor, padding_mask: Tensor, spatial_shapes: SpatialShapes, valid_ratios: Tensor):
    """Two-stage: one box proposal per memory position (its pixel, size 0.05 * 2^level).

    memory [B, S, d], padding_mask [B, S], valid_ratios [B, L, 2] (the image's width and height
    in each level's cells: valid_ratios * (W_l, H_l); officially the count of valid cells,
    which the mask-derived ratios give) -> (memory [B, S, d] zeroed where the proposal
    is unusable, proposal logits [B, S, 4] (cx, cy, w, h), +inf where unusable: padding,
    or a coordinate outside (0.01, 0.99)).
    """
    bsz = memory.shape[0]
    proposals, start = [], 0
    for level, (h, w) in enumerate(spatial_shapes):
        start += h * w
        extent = valid_ratios[:, level] * torch.tensor([w, h], dtype=memory.dtype, device=memory.device)
        ys = torch.arange(h, dtype=memory.dtype, device=memory.device)
        xs = torch.arange(w, dtype=memory.dtype, device=memory.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([grid_x, grid_y], -1)[None] + 0.5  # [1, H, W, 2]
        grid = grid / extent[:, None, None, :]
        wh = torch.full_like(grid, 0.05 * 2.0 ** level)
        proposals.append(torch.cat([grid, wh], -1).view(bsz, -1, 4))
    proposals = torch.cat(proposals, 1)
    usable = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True) & ~padding_mask[..., None]
    logits = torch.log(proposals / (1 - proposals)).masked_fill(~usable, float("inf"))
    return memory.masked_fill(~usable, 0.0), logits


class DeformableTransformer(nn.Module):
    """Deformable DETR's encoder-decoder. Classes take plain keyword arguments.

    ``two_stage``: the decoder's queries are the ``two_stage_num_proposals`` best
    encoder proposals (scored by ``decoder.class_embed[-1]``, boxes refined by
    ``decoder.bbox_embed[-1]``, both set by the detector) instead of learned embeddings.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, enc_n_points: int = 4, dec_n_points: int = 4,
                 two_stage: bool = False, two_stage_num_proposals: int = 300):
        super().__init__()
        self.d_model, self.nhead = d_model, nhead
        self.two_stage, self.two_stage_num_proposals = two_stage, two_stage_num_proposals
        self.encoder = DeformableEncoder(DeformableEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points), num_encoder_layers)
        self.decoder = DeformableDecoder(DeformableDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points), num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():  # undo xavier where deformable attention has its own init
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def _flatten(self, srcs: List[Tensor], masks: List[Tensor], pos_embeds: List[Tensor]):
        """Levels [B, d, H_l, W_l] -> src, pos [B, S, d] (pos plus level_embed), mask [B, S]."""
        if len(srcs) != self.level_embed.shape[0]:
            raise ValueError(f"{len(srcs)} feature levels for a transformer built for "
                             f"{self.level_embed.shape[0]}")
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i]
                         for i, p in enumerate(pos_embeds)], 1)
        return src, mask, pos

    def _two_stage_queries(self, memory: Tensor, mask: Tensor, spatial_shapes: SpatialShapes,
                           valid_ratios: Tensor):
        """-> (query_pos, tgt [B, Q, d], reference boxes [B, Q, 4], encoder class logits
        [B, S, C], encoder box logits [B, S, 4])."""
        out_memory, proposals = encoder_proposals(memory, mask, spatial_shapes, valid_ratios)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        enc_class = self.decoder.class_embed[self.decoder.num_layers](out_memory)
        enc_coord = self.decoder.bbox_embed[self.decoder.num_layers](out_memory) + proposals
        k = self.two_stage_num_proposals
        if k > memory.shape[1]:
            raise ValueError(f"two-stage needs at least {k} memory positions (num_queries), "
                             f"the image gives {memory.shape[1]}: use a larger image or fewer queries")
        top = torch.topk(enc_class[..., 0], k, dim=1)[1]  # class 0 scores "any object"
        boxes = torch.gather(enc_coord, 1, top[..., None].expand(-1, -1, 4)).detach()
        embed = self.pos_trans_norm(self.pos_trans(proposal_pos_embed(boxes, self.d_model // 2)))
        query_pos, tgt = embed.split(self.d_model, -1)
        return query_pos, tgt, boxes.sigmoid(), enc_class, enc_coord

    def forward(self, srcs: List[Tensor], masks: List[Tensor], pos_embeds: List[Tensor],
                query_embed: Optional[Tensor] = None, valid_ratios: Optional[Tensor] = None):
        """srcs, pos_embeds: L levels [B, d, H_l, W_l]; masks: L [B, H_l, W_l] True on padding;
        query_embed [Q, 2d] (query_pos, tgt), None in two-stage; valid_ratios [B, L, 2], the
        image's (width, height) share of each level (default: from the masks, as officially).

        Returns (hs [n_dec, B, Q, d], initial references [B, Q, 2 or 4], per-layer
        references [n_dec, B, Q, 2 or 4], and two-stage encoder class logits [B, S, C] and
        box logits [B, S, 4], else None, None).
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed is required unless two_stage")
        spatial_shapes = [tuple(s.shape[-2:]) for s in srcs]  # traced sizes while exported to ONNX
        src, mask, pos = self._flatten(srcs, masks, pos_embeds)
        if valid_ratios is None:
            valid_ratios = torch.stack([valid_ratios_of(m) for m in masks], 1).to(src.dtype)  # [B, L, 2]
        memory = self.encoder(src, spatial_shapes, valid_ratios, pos, mask)
        enc_class = enc_coord = None
        if self.two_stage:
            query_pos, tgt, reference, enc_class, enc_coord = self._two_stage_queries(
                memory, mask, spatial_shapes, valid_ratios)
        else:
            bsz = memory.shape[0]
            query_pos, tgt = query_embed.split(self.d_model, -1)
            query_pos = query_pos[None].expand(bsz, -1, -1)
            tgt = tgt[None].expand(bsz, -1, -1)
            reference = self.reference_points(query_pos).sigmoid()
        hs, references = self.decoder(tgt, reference, memory, spatial_shapes, valid_ratios, query_pos, mask)
        return hs, reference, references, enc_class, enc_coord
