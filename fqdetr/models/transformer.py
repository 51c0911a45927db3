"""DETR transformer: encoder-decoder on sequence-first tensors [S, B, d].

Uses ``nn.MultiheadAttention`` (batch_first=False, packed ``in_proj_weight``) as the
original code, so module and parameter names match the official checkpoints:
``encoder.layers.{i}.{self_attn,linear1,linear2,norm1,norm2}``,
``decoder.layers.{i}.{self_attn,multihead_attn,linear1,linear2,norm1,norm2,norm3}``,
``decoder.norm``. Position encodings are added to queries and keys at every layer
(never to values), which is DETR's design.
"""
import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


def _activation(name: str):
    acts = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}, got {name!r}")
    return acts[name]


class TransformerEncoderLayer(nn.Module):
    """Self-attention + FFN, post-norm by default (``normalize_before`` = pre-norm)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None) -> Tensor:
        """src, pos: [S, B, d]; src_key_padding_mask: [B, S] True on padding -> [S, B, d]."""
        if self.normalize_before:
            x = self.norm1(src)
            q = k = _with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(q, k, x, attn_mask=src_mask,
                                                     key_padding_mask=src_key_padding_mask)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        q = k = _with_pos(src, pos)
        src2 = self.self_attn(q, k, src, attn_mask=src_mask, key_padding_mask=src_key_padding_mask)[0]
        src = self.norm1(src + self.dropout1(src2))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the memory, FFN; three norms."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None) -> Tensor:
        """tgt, query_pos: [Q, B, d]; memory, pos: [S, B, d];
        memory_key_padding_mask: [B, S] -> [Q, B, d]."""
        pre = self.normalize_before
        x = self.norm1(tgt) if pre else tgt
        q = k = _with_pos(x, query_pos)
        tgt = tgt + self.dropout1(self.self_attn(q, k, x, attn_mask=tgt_mask,
                                                 key_padding_mask=tgt_key_padding_mask)[0])
        if not pre:
            tgt = self.norm1(tgt)
        x = self.norm2(tgt) if pre else tgt
        tgt = tgt + self.dropout2(self.multihead_attn(
            _with_pos(x, query_pos), _with_pos(memory, pos), memory, attn_mask=memory_mask,
            key_padding_mask=memory_key_padding_mask)[0])
        if not pre:
            tgt = self.norm2(tgt)
        x = self.norm3(tgt) if pre else tgt
        tgt = tgt + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return tgt if pre else self.norm3(tgt)


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class TransformerEncoder(nn.Module):
    """Stack of encoder layers with an optional final norm (present only in pre-norm)."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None) -> Tensor:
        """src, pos: [S, B, d] -> memory [S, B, d]."""
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return out if self.norm is None else self.norm(out)


class TransformerDecoder(nn.Module):
    """Stack of decoder layers; the final ``norm`` is applied to every returned output."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None,
                 return_intermediate: bool = False):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt: Tensor, memory: Tensor, **kwargs) -> Tensor:
        """tgt [Q, B, d], memory [S, B, d] -> [L, Q, B, d] with L = num_layers when
        return_intermediate (the auxiliary-loss inputs) else L = 1.
        kwargs: the masks and pos/query_pos of TransformerDecoderLayer.forward."""
        out, intermediate = tgt, []
        norm = self.norm if self.norm is not None else (lambda t: t)
        for layer in self.layers:
            out = layer(out, memory, **kwargs)
            if self.return_intermediate:
                intermediate.append(norm(out))
        if self.return_intermediate:
            return torch.stack(intermediate)
        return norm(out).unsqueeze(0)


class Transformer(nn.Module):
    """DETR's encoder-decoder. Classes take plain keyword arguments."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False,
                 return_intermediate_dec: bool = False):
        super().__init__()
        enc_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                            normalize_before)
        self.encoder = TransformerEncoder(enc_layer, num_encoder_layers,
                                          nn.LayerNorm(d_model) if normalize_before else None)
        dec_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                            normalize_before)
        self.decoder = TransformerDecoder(dec_layer, num_decoder_layers, nn.LayerNorm(d_model),
                                          return_intermediate=return_intermediate_dec)
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor):
        """src [B, d, h, w], mask [B, h, w] (True on padding), query_embed [Q, d],
        pos_embed [B, d, h, w] -> (hs [L, B, Q, d], memory [B, d, h, w])."""
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)              # [hw, B, d]
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)  # [hw, B, d]
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)  # [Q, B, d]
        mask = mask.flatten(1)                              # [B, hw]
        tgt = torch.zeros_like(query_embed)  # decoder input is zeros; queries enter via query_pos
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).reshape(bs, c, h, w)
