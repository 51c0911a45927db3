"""Per-sample Fisher of a 2-D convolution's weight, on top of the linear kernel.

The unfolded input of a convolution is X_n [Ho*Wo, C/groups*kh*kw] per group, so its
per-sample weight gradient is the linear layer's D_n^T X_n. Small feature maps (T = Ho*Wo
below WGRAD_MIN_T) are unfolded in bounded chunks and go through ``per_sample_fisher``;
larger ones take G_n from torch's convolution weight-gradient kernel, which never
unfolds, one sample at a time into a weight-sized buffer.

  conv2d_per_sample_fisher(x, grad_out, weight_shape, ...)  after a backward
  conv2d_with_fisher(x, weight, bias, fisher, ...)           F.conv2d whose backward
                                                             takes dW from the same pass
"""
import torch
import torch.nn.functional as F

from fqkernels import checks
from fqkernels.fisher import per_sample_fisher

DEFAULT_CHUNK_BYTES = 32 << 20
# From T = Ho*Wo outputs per sample, torch's weight-gradient kernel per sample beats unfolding:
# 1.3-20x on the shipped tiny DETR's backbone convolutions at T = 540-8560 (benchmarks/RESULTS.md,
# "Whole model"); at T = 140 neither wins everywhere.
WGRAD_MIN_T = 512


def _pair(v, name):
    v = (v, v) if isinstance(v, int) else tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")
    return v


def _check_input(x, weight_shape, groups):
    checks.check_tensor(x, "x", dim=4)
    if len(weight_shape) != 4:
        raise ValueError(f"weight_shape: expected [out, in/groups, kh, kw], got {list(weight_shape)}")
    o, cg = weight_shape[:2]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or o % groups:
        raise ValueError(f"groups: expected a positive divisor of the {o} output channels, got {groups}")
    if x.shape[1] != cg * groups:
        raise ValueError(f"x: expected {cg * groups} channels (weight_shape {list(weight_shape)}, groups {groups}), "
                         f"got shape {list(x.shape)}")


def _check_conv(x, grad_out, weight_shape, stride, padding, dilation, groups):
    _check_input(x, weight_shape, groups)
    checks.check_tensor(grad_out, "grad_out", dim=4)
    checks.check_same_device(x, "x", grad_out, "grad_out")
    o, _, kh, kw = weight_shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if tuple(grad_out.shape) != (x.shape[0], o, ho, wo):
        raise ValueError(f"grad_out: expected shape {[x.shape[0], o, ho, wo]} for this convolution, "
                         f"got {list(grad_out.shape)}")


def _accumulate(x, grad_out, weight_shape, stride, padding, dilation, groups, fisher, grad_weight, chunk_bytes,
                backend):
    """fisher += sum_n G_n^2 and, when given, grad_weight = sum_n G_n (float32, weight_shape)."""
    o, cg, kh, kw = weight_shape
    n, ho, wo = x.shape[0], grad_out.shape[2], grad_out.shape[3]
    kg, og = cg * kh * kw, o // groups
    if grad_weight is not None:
        grad_weight.zero_()
    sample_bytes = groups * kg * ho * wo * x.element_size()
    if sample_bytes <= chunk_bytes and ho * wo < WGRAD_MIN_T:
        per_group = fisher.view(groups, og, kg)
        dw = grad_weight.view(groups, og, kg) if grad_weight is not None else None
        dw_chunk = torch.empty(og, kg, dtype=torch.float32, device=x.device) if dw is not None else None
        step = max(1, chunk_bytes // max(sample_bytes, 1))
        for s in range(0, n, step):
            cols = F.unfold(x[s:s + step], (kh, kw), dilation, padding, stride)
            cols = cols.view(cols.shape[0], groups, kg, ho * wo)
            d = grad_out[s:s + step].reshape(cols.shape[0], groups, og, ho * wo)
            for g in range(groups):  # [n, L, K] and [n, L, M] views by strides: no copies
                per_sample_fisher(cols[:, g].transpose(1, 2), d[:, g].transpose(1, 2), out=per_group[g],
                                  grad_weight=dw_chunk, backend=backend)
                if dw is not None:
                    dw[g] += dw_chunk
        return
    # Large samples: G_n by the convolution's own weight-gradient kernel (implicit im2col,
    # nothing unfolded); per sample it is faster than the batched call on these shapes.
    for i in range(n):
        g_n = torch.nn.grad.conv2d_weight(x[i:i + 1].float(), weight_shape, grad_out[i:i + 1].float(), stride,
                                          padding, dilation, groups)
        fisher.addcmul_(g_n, g_n) if fisher.dtype == torch.float32 else fisher.add_(g_n.to(fisher.dtype).square())
        if grad_weight is not None:
            grad_weight += g_n


def conv2d_per_sample_fisher(x, grad_out, weight_shape, stride=1, padding=0, dilation=1, groups=1,
                             dtype=torch.float32, out=None, chunk_bytes=DEFAULT_CHUNK_BYTES, backend=None):
    """sum_n (grad of conv2d's weight for sample n)^2 -> [out, in/groups, kh, kw].

    x [N, C, H, W] is the convolution's input, grad_out [N, O, Ho, Wo] the gradient of the
    per-sample-summed loss w.r.t. its output. At most ``chunk_bytes`` of unfolded input
    exist at a time; samples whose own unfolded input exceeds that, or with WGRAD_MIN_T
    outputs or more, use torch's weight-gradient kernel one sample at a time. ``out``:
    optional float32/float64 buffer of weight_shape that the result is added into.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    _check_conv(x, grad_out, weight_shape, stride, padding, dilation, groups)
    if dtype not in checks.ACCUM_DTYPES:
        raise TypeError(f"dtype: expected torch.float32 or torch.float64 accumulation, got {dtype}")
    if out is not None:
        checks.check_output(out, "out", weight_shape, x)
    fisher = out if out is not None else torch.zeros(weight_shape, dtype=dtype, device=x.device)
    _accumulate(x, grad_out, tuple(weight_shape), stride, padding, dilation, groups, fisher, None, chunk_bytes,
                backend)
    return fisher


class _Conv2dWithFisher(torch.autograd.Function):
    """F.conv2d whose backward takes dW from the per-sample pass that feeds the Fisher,
    so collecting it replaces the weight-gradient convolution instead of adding one."""

    @staticmethod
    def forward(ctx, x, weight, bias, fisher, fisher_mask, stride, padding, dilation, groups, chunk_bytes, backend):
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.fisher_mask = (stride, padding, dilation, groups), fisher_mask
        ctx.fisher, ctx.chunk_bytes, ctx.backend, ctx.has_bias = fisher, chunk_bytes, backend, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_y, stride, padding, dilation, groups)
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        mask = ctx.fisher_mask
        fisher = ctx.fisher if mask is None else torch.zeros_like(ctx.fisher)
        _accumulate(x, grad_y, tuple(weight.shape), stride, padding, dilation, groups, fisher, grad_w,
                    ctx.chunk_bytes, ctx.backend)
        if mask is not None:
            ctx.fisher.addcmul_(fisher, mask.to(fisher.dtype))
        grad_b = grad_y.sum((0, 2, 3)).to(weight.dtype) if ctx.has_bias else None
        return grad_x, grad_w.to(weight.dtype), grad_b, None, None, None, None, None, None, None, None


def conv2d_with_fisher(x, weight, bias, fisher, stride=1, padding=0, dilation=1, groups=1, fisher_mask=None,
                       chunk_bytes=DEFAULT_CHUNK_BYTES, backend=None):
    """F.conv2d (x [N, C, H, W], weight [O, C/groups, kh, kw]) whose backward also adds
    sum_n G_n^2 into ``fisher`` (float32/float64, weight's shape) in the same pass that
    produces the weight gradient: the convolution counterpart of ``linear_with_fisher``.
    The loss must be a sum of per-sample losses. ``fisher_mask`` (weight's shape): added
    as mask * sum_n G_n^2, e.g. the straight-through mask when ``weight`` is a fake-
    quantized copy of the latent weight whose Fisher is wanted."""
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    checks.check_tensor(weight, "weight", dim=4)
    _check_input(x, tuple(weight.shape), groups)
    checks.check_output(fisher, "fisher", tuple(weight.shape), x)
    if fisher_mask is not None and tuple(fisher_mask.shape) != tuple(weight.shape):
        raise ValueError(f"fisher_mask: expected weight's shape {list(weight.shape)}, got {list(fisher_mask.shape)}")
    return _Conv2dWithFisher.apply(x, weight, bias, fisher, fisher_mask, stride, padding, dilation, groups,
                                   chunk_bytes, backend)
