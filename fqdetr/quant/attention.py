"""QuantMultiheadAttention: nn.MultiheadAttention with quantized projections and,
optionally, quantized attention products.

It subclasses nn.MultiheadAttention so parameter names stay ``in_proj_weight``,
``in_proj_bias``, ``out_proj.*`` (DETR checkpoints load unchanged). The packed
in-projection [3E, E] is quantized per output channel with one scale vector
[3E]; the query, key and value inputs each have their own activation quantizer.
With ``quantize_attention`` the products Q K^T and A V run through
``fqkernels.quant_matmul`` (Q, K, V signed; attention probabilities unsigned).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import fqkernels as fk
from fqdetr.quant.config import LayerQuantConfig
from fqdetr.quant.modules import QuantLinear, quantized_linear
from fqdetr.quant.quantizer import Quantizer


class QuantMultiheadAttention(nn.MultiheadAttention):
    """Same call signature and outputs as nn.MultiheadAttention (batch_first either way)."""

    # The in- and out-projections run on sequence-first [L, N, E] tensors whatever batch_first
    # says, so their per-sample Fisher finds the samples on this dimension.
    PROJECTION_SAMPLE_DIM = 1

    @classmethod
    def from_float(cls, mha, config=None):
        config = config or LayerQuantConfig()
        if mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
            raise ValueError("mha: add_bias_kv, add_zero_attn and kdim/vdim != embed_dim are not supported")
        w = mha.in_proj_weight
        q = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None,
                batch_first=mha.batch_first, device=w.device, dtype=w.dtype)
        q.in_proj_weight, q.in_proj_bias = mha.in_proj_weight, mha.in_proj_bias
        q.out_proj = QuantLinear.from_float(mha.out_proj, config)
        q.quant_config = config
        q.weight_quantizer = Quantizer.for_weight(config, q.in_proj_weight)
        q.input_quantizers = nn.ModuleList(
            [Quantizer.from_config(config, config.a_bits, config.a_signed) for _ in range(3)]
            if config.a_bits is not None else [])
        q.product_quantizers = nn.ModuleDict()
        if config.quantize_attention:
            q.product_quantizers.update({name: Quantizer.from_config(config, config.attn_bits, signed)
                                         for name, signed in (("q", True), ("k", True), ("attn", False),
                                                              ("v", True))})
        q.fake_quant_enabled = True
        q.fisher_accumulator = None  # [3E, E]
        q.fisher_batch_dim = q.out_proj.fisher_batch_dim = cls.PROJECTION_SAMPLE_DIM
        return q

    def to_float(self):
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, self.in_proj_bias is not None,
                                    batch_first=self.batch_first, device=self.in_proj_weight.device,
                                    dtype=self.in_proj_weight.dtype)
        mha.in_proj_weight, mha.in_proj_bias = self.in_proj_weight, self.in_proj_bias
        mha.out_proj.weight, mha.out_proj.bias = self.out_proj.weight, self.out_proj.bias
        return mha

    def _project(self, x, i):
        """x [L, N, E] -> the i-th (q, k, v) projection [L, N, E]."""
        aq = self.input_quantizers[i] if len(self.input_quantizers) else None
        rows = slice(i * self.embed_dim, (i + 1) * self.embed_dim)
        return quantized_linear(self, x, self.in_proj_weight, self.in_proj_bias, aq, rows)

    def _product(self, a, b, name_a, name_b):
        """a @ b, through quant_matmul when the attention products are quantized."""
        if not (self.fake_quant_enabled and len(self.product_quantizers)):
            return torch.bmm(a, b)
        qa, qb = self.product_quantizers[name_a], self.product_quantizers[name_b]
        return fk.quant_matmul(a, b, qa.prepare(a), qb.prepare(b), qa.bits, qb.bits, bool(qa.signed),
                               bool(qb.signed), qa.grad_factor(a), qb.grad_factor(b))

    def _merged_mask(self, attn_mask, key_padding_mask, N, L, S, dtype):
        """Additive float mask [N*heads, L, S] (or None) from torch's mask conventions."""
        def additive(m):
            return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool \
                else m.to(dtype)
        mask = None
        if attn_mask is not None:
            mask = additive(attn_mask)
            if mask.dim() == 2:
                if mask.shape != (L, S):
                    raise ValueError(f"attn_mask: expected shape [{L}, {S}], got {list(mask.shape)}")
                mask = mask.unsqueeze(0)
            elif mask.shape != (N * self.num_heads, L, S):
                raise ValueError(f"attn_mask: expected shape [{N * self.num_heads}, {L}, {S}], got "
                                 f"{list(mask.shape)}")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S):
                raise ValueError(f"key_padding_mask: expected shape [{N}, {S}], got {list(key_padding_mask.shape)}")
            kpm = additive(key_padding_mask).view(N, 1, 1, S).expand(N, self.num_heads, 1, S)
            kpm = kpm.reshape(N * self.num_heads, 1, S)
            mask = kpm if mask is None else mask + kpm
        return mask

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """query [L, N, E] (or [N, L, E] when batch_first), key/value [S, N, E] likewise.

        Returns (output like query, attention weights [N, L, S] averaged over heads, or
        [N, heads, L, S], or None when need_weights is False).
        """
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        L, N, E = query.shape
        S, h = key.shape[0], self.num_heads
        d = E // h
        q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
        # [L, N, E] -> [N*h, L, d]; scale q before the product as torch does.
        q = q.reshape(L, N * h, d).transpose(0, 1) * (1.0 / math.sqrt(d))
        k = k.reshape(S, N * h, d).transpose(0, 1)
        v = v.reshape(S, N * h, d).transpose(0, 1)
        scores = self._product(q, k.transpose(1, 2), "q", "k")
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).triu(1)
        mask = self._merged_mask(attn_mask, key_padding_mask, N, L, S, scores.dtype)
        if mask is not None:
            scores = scores + mask
        attn = F.dropout(scores.softmax(dim=-1), p=self.dropout, training=self.training)
        out = self._product(attn, v, "attn", "v")
        out = self.out_proj(out.transpose(0, 1).reshape(L, N, E))
        if self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = attn.view(N, h, L, S)
        return out, weights.mean(dim=1) if average_attn_weights else weights
