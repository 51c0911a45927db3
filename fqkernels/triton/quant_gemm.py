"""One tiled Triton GEMM for the quant_linear / quant_matmul family, forward and backward:

    C[z, m, n] = sum_k A'[z, m, k] * B'[z, k, n]

where A' and B' are the operands fake-quantized in the prologue, tile by tile as they
are loaded (never written back), and the epilogue is one of
    forward:   C * a_scale * b_scale[n] (integer path) + bias[n];
    STE:       C is the gradient of a fake-quantized tensor E (shape of C): the kernel
               writes STE-mask(C) and adds the LSQ scale gradient, reduced over the tile,
               into grad_scale (per tensor, or per row m) with one atomic per row.
Integer path (INT_DOT): both operands' clamped codes fit int8 (signed, or unsigned up
to 7 bits), are multiplied by an int8 tl.dot with int32 accumulation (exact for
K < 2^17), and scaled in the epilogue.

Runs on CUDA and under TRITON_INTERPRET=1 on CPU tensors (fp32 and int8 dots only).
Rounding is round-half-even by the 1.5 * 2^23 trick (no libdevice rint), and kernels
are compiled with enable_fp_fusion=False so x * inv_scale is rounded before the
trick's addition, as in the reference (an FMA would round differently at ties).
"""
import triton
import triton.language as tl

from fqkernels.gemm_backends import SCALE_TENSOR, Quant, QuantLinear, QuantMatmul, Ste, use_int_dot
from fqkernels.triton.launch import MAX_GRID_YZ, on_device_of


@triton.jit
def _codes(v, inv, qmin, qmax):
    """Clamped codes clamp(round_half_even(v * inv)), float; NaN stays NaN."""
    x = v * inv
    q = tl.where(tl.abs(x) < 4194304.0, (x + 12582912.0) - 12582912.0, x)
    return tl.where(q < qmin, qmin, tl.where(q > qmax, qmax, q))


@triton.jit
def _prologue(v, scale, inv, qmin, qmax, QUANT: tl.constexpr, INT_DOT: tl.constexpr):
    """An operand tile as the dot consumes it: int8 codes, fake-quant values, or as loaded.
    One return: the compiler reads every constexpr branch's return, and their types differ."""
    r = v
    if QUANT:
        q = _codes(v, inv, qmin, qmax)
        if INT_DOT:
            r = q.to(tl.int8)
        else:
            r = q * scale
    return r


@triton.jit
def _ste_epilogue(acc, offs_m, row_mask, mask, e_ptr, e_offs, e_scale_ptr, e_inv_ptr, e_qmin, e_qmax, grad_factor,
                  grad_scale_ptr, E_PER_ROW: tl.constexpr):
    """Returns STE-mask(acc) against E and adds the LSQ scale gradient into grad_scale."""
    e = tl.load(e_ptr + e_offs, mask=mask, other=0.0).to(tl.float32)
    if E_PER_ROW:
        s = tl.load(e_scale_ptr + offs_m, mask=row_mask, other=1.0)[:, None]
        inv = tl.load(e_inv_ptr + offs_m, mask=row_mask, other=1.0)[:, None]
    else:
        s = tl.load(e_scale_ptr)
        inv = tl.load(e_inv_ptr)
    x = e * inv
    q = tl.where(tl.abs(x) < 4194304.0, (x + 12582912.0) - 12582912.0, x)
    inside = (q >= e_qmin) & (q <= e_qmax)
    ds = tl.where(q < e_qmin, e_qmin, tl.where(q > e_qmax, e_qmax, (q * s - e) * inv))
    rows = tl.sum(tl.where(mask, acc * ds, 0.0), axis=1) * grad_factor
    if E_PER_ROW:
        tl.atomic_add(grad_scale_ptr + offs_m, rows, mask=row_mask)
    else:
        tl.atomic_add(grad_scale_ptr, tl.sum(rows, axis=0))
    return tl.where(inside, acc, 0.0)


@triton.jit
def quant_gemm_kernel(
    # operands and output, [Z, M, K] x [Z, K, N] -> [Z, M, N], any strides (0 broadcasts)
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_az, stride_am, stride_ak, stride_bz, stride_bk, stride_bn, stride_cz, stride_cm, stride_cn,
    # prologue quantization: A per tensor; B per tensor, per n or per k (B_SCALE)
    a_scale_ptr, a_inv_ptr, a_qmin, a_qmax, b_scale_ptr, b_inv_ptr, b_qmin, b_qmax,
    # forward epilogue
    bias_ptr,
    # STE epilogue: E [Z, M, N] with C's layout, its scale per tensor or per row m
    e_ptr, e_scale_ptr, e_inv_ptr, e_qmin, e_qmax, grad_factor, grad_scale_ptr,
    QUANT_A: tl.constexpr, QUANT_B: tl.constexpr, B_SCALE: tl.constexpr, INT_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr, STE: tl.constexpr, E_PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # int64 offsets: offset * stride overflows int32 on tensors of 2^31 elements.
    pid_m, pid_n, pid_z = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    a_base = a_ptr + pid_z * stride_az + offs_m[:, None] * stride_am
    b_base = b_ptr + pid_z * stride_bz + offs_n[None, :] * stride_bn
    a_scale, a_inv, b_scale, b_inv = 1.0, 1.0, 1.0, 1.0
    if QUANT_A:
        a_scale, a_inv = tl.load(a_scale_ptr), tl.load(a_inv_ptr)
    if QUANT_B:
        if B_SCALE == 0:
            b_scale, b_inv = tl.load(b_scale_ptr), tl.load(b_inv_ptr)
        if B_SCALE == 1:
            b_scale = tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=1.0)[None, :]
            b_inv = tl.load(b_inv_ptr + offs_n, mask=offs_n < N, other=1.0)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if INT_DOT else tl.float32)
    # Integer path: an int8 code cannot hold NaN, so rows of A / columns of B that hold one
    # are flagged and their outputs set to NaN, as the float product would make them.
    a_nan = tl.zeros((BLOCK_M,), dtype=tl.int32)
    b_nan = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_base + k[None, :] * stride_ak, mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_base + k[:, None] * stride_bk, mask=(k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        a, b = a.to(tl.float32), b.to(tl.float32)
        if INT_DOT:
            a_nan = tl.maximum(a_nan, tl.max((a != a).to(tl.int32), axis=1))
            b_nan = tl.maximum(b_nan, tl.max((b != b).to(tl.int32), axis=0))
        a = _prologue(a, a_scale, a_inv, a_qmin, a_qmax, QUANT_A, INT_DOT)
        if QUANT_B and B_SCALE == 2:  # per-k scales (dX = dY Qw(W)): new names, not loop-carried
            bs = tl.load(b_scale_ptr + k, mask=k < K, other=1.0)[:, None]
            bi = tl.load(b_inv_ptr + k, mask=k < K, other=1.0)[:, None]
            b = _prologue(b, bs, bi, b_qmin, b_qmax, QUANT_B, INT_DOT)
        else:
            b = _prologue(b, b_scale, b_inv, b_qmin, b_qmax, QUANT_B, INT_DOT)
        if INT_DOT:
            acc += tl.dot(a, b, out_dtype=tl.int32)
        else:  # "ieee": no TF32 on the GPU, the float path must match the reference
            acc += tl.dot(a, b, input_precision="ieee")
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y = acc.to(tl.float32)
    if INT_DOT:
        y = y * (a_scale * b_scale)
        y = tl.where((a_nan[:, None] + b_nan[None, :]) > 0, float("nan"), y)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    c_offs = pid_z * stride_cz + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if STE:
        y = _ste_epilogue(y, offs_m, offs_m < M, mask, e_ptr, c_offs, e_scale_ptr, e_inv_ptr, e_qmin, e_qmax,
                          grad_factor, grad_scale_ptr, E_PER_ROW)
    tl.store(c_ptr + c_offs, y, mask=mask)


def _grid(M, N, Z, meta):
    return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), Z)


def quant_gemm(a, b, out, qa=None, qb=None, b_scale=SCALE_TENSOR, bias=None, ste=None):
    """out[z] = A'[z] @ B'[z] with the kernel above.

    a [Z, M, K], b [Z, K, N], out [Z, M, N] float32, any strides. qa / qb: Quant or None.
    ste: None, or a gemm_backends.Ste for the STE epilogue (e strided like out).
    """
    Z, M, K = a.shape
    N = b.shape[2]
    if triton.cdiv(N, 64) > MAX_GRID_YZ:
        raise ValueError(f"b: at most {64 * MAX_GRID_YZ} columns, got {N}")
    has_ste = ste is not None
    # Without an STE epilogue its pointers are never read: out stands in for them.
    ste = ste or Ste(out, Quant.identity(a.device), False, 1.0, out)
    if any(size > 1 and se != so for size, se, so in zip(out.shape, ste.e.stride(), out.stride())):
        raise ValueError("ste: expected e with the strides of out")  # size-1 dims are only indexed at 0
    qa_, qb_ = (q or Quant.identity(a.device) for q in (qa, qb))
    for z0 in range(0, Z, MAX_GRID_YZ):  # batches beyond the grid's z limit: one launch per slice
        z = slice(z0, z0 + MAX_GRID_YZ)
        with on_device_of(a):
            _launch(a[z], b[z], out[z], qa, qb, qa_, qb_, b_scale, bias, ste._replace(e=ste.e[z]), has_ste)
    return out


def _launch(a, b, out, qa, qb, qa_, qb_, b_scale, bias, ste, has_ste):
    (Z, M, K), N = a.shape, b.shape[2]
    int_dot = use_int_dot(qa, qb, K, b_scale)
    unused = out  # pointer arguments behind a false constexpr flag are never read
    quant_gemm_kernel[lambda meta: _grid(M, N, Z, meta)](
        a, b, out, M, N, K, *a.stride(), *b.stride(), *out.stride(),
        qa_.scale, qa_.inv, qa_.qmin, qa_.qmax, qb_.scale, qb_.inv, qb_.qmin, qb_.qmax,
        unused if bias is None else bias,
        ste.e, ste.quant.scale, ste.quant.inv, ste.quant.qmin, ste.quant.qmax, ste.grad_factor, ste.grad_scale,
        QUANT_A=qa is not None, QUANT_B=qb is not None, B_SCALE=b_scale, INT_DOT=int_dot,
        HAS_BIAS=bias is not None, STE=has_ste, E_PER_ROW=ste.per_row,
        BLOCK_M=64, BLOCK_N=64, BLOCK_K=64 if int_dot else 32, num_warps=4, enable_fp_fusion=False,
    )


QUANT_LINEAR = QuantLinear(quant_gemm)
QUANT_MATMUL = QuantMatmul(quant_gemm)
