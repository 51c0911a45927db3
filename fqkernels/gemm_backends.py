"""quant_linear and quant_matmul as launches of one fused GEMM, `quant_gemm` (operands
quantized in the prologue; the backward GEMMs carry the STE mask and the LSQ
scale-gradient reduction in their epilogues). Shared by the `triton` backend
(fqkernels/triton/quant_gemm.py) and the `cuda` backend (csrc/cuda/quant_linear.cu),
which differ only in the quant_gemm they pass in:

    quant_gemm(a [Z,M,K], b [Z,K,N], out [Z,M,N] float32, qa, qb, b_scale=SCALE_TENSOR,
               bias=None, ste=None) -> out          (qa, qb: Quant or None; ste: Ste or None)

    forward   y  = Qa(x) Qw(W)^T + b          integer path when both fit int8
    backward  dX = STE_a(dY Qw(W))            + grad_a_scale (epilogue, per tensor)
              dW = STE_w(dY^T Qa(x))          + grad_w_scale (epilogue, per row)
"""
import math
from typing import NamedTuple, Optional

import torch

from fqkernels import _ext, reference
from fqkernels.util import accumulate_fisher

# B operand scale layouts.
SCALE_TENSOR, SCALE_PER_N, SCALE_PER_K = 0, 1, 2


class Quant:
    """Quantization of one operand: scale (float32 tensor), bits, signedness."""

    def __init__(self, scale, bits, signed):
        self.scale = scale.float().contiguous()
        self.inv = reference.inv_scale(self.scale)  # as the reference computes it
        self.bits, self.signed = bits, signed
        self.qmin, self.qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)

    @staticmethod
    def identity(device):
        """Stands in for an operand that is not quantized (its values are never read)."""
        return Quant(torch.ones(1, device=device), 8, True)

    @property
    def fits_int8(self):
        return self.qmin >= -128 and self.qmax <= 127


class Ste(NamedTuple):
    """The STE epilogue of a backward GEMM: the output is the gradient of fake-quantized
    ``e`` (shaped and strided like the output); it is masked where e's codes are out of
    range, and the LSQ scale gradient (times ``grad_factor``) is ADDED into ``grad_scale``
    (zero it first): one element, or one per output row when ``per_row``."""
    e: torch.Tensor
    quant: Quant
    per_row: bool
    grad_factor: float
    grad_scale: torch.Tensor


def use_int_dot(qa, qb, K, b_scale):
    """The exact integer path applies: both operands' codes fit int8, the scales factor out
    of the sum (not per k), and int32 cannot overflow (K * 128 * 128 < 2^31)."""
    return (qa is not None and qb is not None and qa.fits_int8 and qb.fits_int8 and K < 2**17
            and b_scale != SCALE_PER_K)


def _3d(t):
    return t.unsqueeze(0)


def _same_dtype(*tensors):
    """The kernels read every operand in one dtype: mixed inputs are all read as float32."""
    if len({t.dtype for t in tensors}) == 1:
        return tensors
    return tuple(t.float() for t in tensors)


class _GemmBackend:
    """A backend built on one quant_gemm launcher (triton's or cuda's)."""

    def __init__(self, quant_gemm):
        self.launch = quant_gemm

    def quant_gemm(self, a, b, out, qa=None, qb=None, b_scale=SCALE_TENSOR, bias=None, ste=None):
        """The launcher, except on empty problems, which launch nothing: an empty output has
        nothing to write, and K = 0 gives out = bias (or 0), whose STE terms are all 0."""
        if out.numel() and a.shape[2]:
            return self.launch(a, b, out, qa, qb, b_scale, bias, ste)
        if out.numel():
            out.copy_(bias.expand(out.shape) if bias is not None else torch.zeros_like(out))
        return out


class QuantLinear(_GemmBackend):

    def forward(self, x, weight, bias, w_scale, a_scale, w_bits, a_bits, a_signed=True):
        dtype = x.dtype
        x, weight = _same_dtype(x, weight)
        x2 = reference.rows(x).contiguous()
        out = torch.empty(x2.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
        qa = None if a_bits is None else Quant(a_scale, a_bits, a_signed)
        self.quant_gemm(_3d(x2), _3d(weight.t()), _3d(out), qa, Quant(w_scale, w_bits, True), SCALE_PER_N,
                        bias=None if bias is None else bias.float().contiguous())
        return out.to(dtype)  # [R, M], R = rows of x: the caller restores x's leading dims

    def backward(self, grad_y, x, weight, w_scale, a_scale, w_bits, a_bits, a_signed=True, w_grad_factor=1.0,
                 a_grad_factor=1.0, fisher=None, batch_dim=0):
        dtypes = x.dtype, weight.dtype
        grad_y, x, weight = _same_dtype(grad_y, x, weight)
        x2 = reference.rows(x).contiguous()
        g = reference.rows(grad_y).contiguous()
        weight = weight.contiguous()
        qa = None if a_bits is None else Quant(a_scale, a_bits, a_signed)
        qw = Quant(w_scale, w_bits, True)
        grad_x = torch.empty(x2.shape, dtype=torch.float32, device=x.device)
        grad_a_scale = None if qa is None else torch.zeros(1, dtype=torch.float32, device=x.device)
        ste_a = None if qa is None else Ste(_3d(x2), qa, False, a_grad_factor, grad_a_scale)
        self.quant_gemm(_3d(g), _3d(weight), _3d(grad_x), None, qw, SCALE_PER_K, ste=ste_a)
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=x.device)
        grad_w_scale = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device)
        self.quant_gemm(_3d(g.t()), _3d(x2), _3d(grad_w), None, qa, SCALE_TENSOR,
                        ste=Ste(_3d(weight), qw, True, w_grad_factor, grad_w_scale))
        if fisher is not None:
            xq = x if a_bits is None else reference.fake_quant_forward(x, a_scale, a_bits, a_signed)
            accumulate_fisher(fisher, xq.float(), grad_y.float(), weight, w_scale, w_bits, batch_dim)
        return (grad_x.reshape(x.shape).to(dtypes[0]), grad_w.to(dtypes[1]), g.float().sum(0),
                grad_w_scale.reshape(w_scale.shape), None if grad_a_scale is None else grad_a_scale.reshape(a_scale.shape))


def _batched(t, batch):
    """t [..., R, C] broadcast to batch + [R, C] and flattened to [Z, R, C] (copies only when broadcast)."""
    return t.expand(*batch, *t.shape[-2:]).reshape(math.prod(batch), *t.shape[-2:])


class QuantMatmul(_GemmBackend):

    def forward(self, a, b, a_scale, b_scale, a_bits, b_bits, a_signed=True, b_signed=True):
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3, b3 = _batched(a, batch), _batched(b.to(a.dtype), batch)
        out = torch.empty(*batch, a.shape[-2], b.shape[-1], dtype=torch.float32, device=a.device)
        self.quant_gemm(a3, b3, out.view(a3.shape[0], a.shape[-2], b.shape[-1]), Quant(a_scale, a_bits, a_signed),
                        Quant(b_scale, b_bits, b_signed))
        return out.to(a.dtype)  # allocated in the output's shape: no view of a tensor made here

    def backward(self, grad_y, a, b, a_scale, b_scale, a_bits, b_bits, a_signed=True, b_signed=True,
                 a_grad_factor=1.0, b_grad_factor=1.0):
        qa, qb = Quant(a_scale, a_bits, a_signed), Quant(b_scale, b_bits, b_signed)
        grad_y = grad_y.to(a.dtype)
        if a.shape[:-2] != b.shape[:-2]:
            return self._broadcast_backward(grad_y, a, b, qa, qb, a_grad_factor, b_grad_factor)
        batch = a.shape[:-2]
        a3, b3 = _batched(a.contiguous(), batch), _batched(b.contiguous(), batch)
        g = _batched(grad_y.contiguous(), batch)
        grad_a, grad_b = torch.empty(a3.shape, device=a.device), torch.empty(b3.shape, device=a.device)
        grad_sa, grad_sb = torch.zeros(1, device=a.device), torch.zeros(1, device=a.device)
        self.quant_gemm(g, b3.transpose(1, 2), grad_a, None, qb, ste=Ste(a3, qa, False, a_grad_factor, grad_sa))
        self.quant_gemm(a3.transpose(1, 2), g, grad_b, qa, None, ste=Ste(b3, qb, False, b_grad_factor, grad_sb))
        return (grad_a.reshape(a.shape).to(a.dtype), grad_b.reshape(b.shape).to(b.dtype),
                grad_sa.reshape(a_scale.shape), grad_sb.reshape(b_scale.shape))

    def _broadcast_backward(self, grad_y, a, b, qa, qb, a_grad_factor, b_grad_factor):
        """Broadcast batch dims: the GEMM gradients are summed over the broadcast dims before
        the STE, so the epilogue cannot be fused; the mask and LSQ terms use the reference."""
        batch = grad_y.shape[:-2]
        a3, b3, g = _batched(a, batch), _batched(b, batch), _batched(grad_y, batch)
        grad_aq = self.quant_gemm(g, b3.transpose(1, 2), torch.empty(a3.shape, device=a.device), None, qb)
        grad_bq = self.quant_gemm(a3.transpose(1, 2), g, torch.empty(b3.shape, device=a.device), qa, None)
        grad_aq = grad_aq.reshape(*batch, *a.shape[-2:]).sum_to_size(a.shape)
        grad_bq = grad_bq.reshape(*batch, *b.shape[-2:]).sum_to_size(b.shape)
        ga, gsa = reference.fake_quant_backward(grad_aq, a.float(), qa.scale, qa.bits, qa.signed, grad_factor=a_grad_factor)
        gb, gsb = reference.fake_quant_backward(grad_bq, b.float(), qb.scale, qb.bits, qb.signed, grad_factor=b_grad_factor)
        return ga.to(a.dtype), gb.to(b.dtype), gsa, gsb


def cuda_quant_gemm(a, b, out, qa=None, qb=None, b_scale=SCALE_TENSOR, bias=None, ste: Optional[Ste] = None):
    """quant_gemm on fqkernels._cuda (same contract as the Triton launcher)."""
    ident = Quant.identity(a.device)
    qa_, qb_, qe_ = (q or ident for q in (qa, qb, None if ste is None else ste.quant))
    dl = _ext.dl
    _ext._cuda.quant_gemm(
        dl(a), dl(b), dl(out), qa is not None, dl(qa_.scale), qa_.bits, qa_.signed, qb is not None,
        dl(qb_.scale), qb_.bits, qb_.signed, b_scale, use_int_dot(qa, qb, a.shape[2], b_scale),
        None if bias is None else dl(bias), None if ste is None else dl(ste.e), dl(qe_.scale), qe_.bits,
        qe_.signed, ste is not None and ste.per_row, 1.0 if ste is None else ste.grad_factor,
        None if ste is None else dl(ste.grad_scale), stream=_ext.stream_of(a))
    return out
