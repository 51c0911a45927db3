"""Pure-PyTorch reference implementation of every fqkernels op, forward and backward.

Written for clarity, not speed: it is the test oracle of the compiled and Triton
backends and the fallback backend. Gradients are written out explicitly (no
autograd) so that each backend's backward can be compared term by term.

Conventions (docs/METHOD.md sections 5.1-5.2; torch's ``_fake_quantize_learnable_*`` with zero
point 0):

    q = round_half_even(x * inv_scale(s)),   y = clamp(q, qmin, qmax) * s
    dy/dx = 1 if qmin <= q <= qmax else 0                       (STE, mask on the code)
    dy/ds = (clamp(q) * s - x) / s inside, qmin below, qmax above (times grad_factor)

Scales: ``axis=None`` per tensor (one element), ``axis=k`` one per index of dim k.
All arithmetic is float32 whatever the input dtype; outputs take the input dtype.
"""
import torch


def qrange(bits, signed):
    """Integer code range (qmin, qmax) of a b-bit signed or unsigned quantizer."""
    levels = 2**bits
    return (-levels // 2, levels // 2 - 1) if signed else (0, levels - 1)


def inv_scale(s):
    """1 / s (float32), at most the largest float32: the reciprocal of a subnormal scale below
    2^-128 overflows, and 0 * inf would make a NaN code where 0 is exactly code 0 at every
    scale (csrc/include/fq/quant_math.h, inv_scale)."""
    return (1.0 / s).clamp(max=torch.finfo(torch.float32).max)


def rows(t):
    """t [*, C] as a 2-D [R, C] view or copy, R the product of the leading dims (also when R or
    C is 0, where reshape(-1, C) is ambiguous)."""
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def _broadcast_scale(scale, x, axis):
    """scale [C] or [1] -> a float32 view broadcastable against x."""
    scale = scale.float().reshape(-1)
    if axis is None:
        return scale.reshape([1] * x.dim()) if x.dim() else scale.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def quant_codes(x, scale, bits, signed, axis=None):
    """Unclamped integer codes round(x / s) as float32 (NaN stays NaN)."""
    s = _broadcast_scale(scale, x, axis)
    return torch.round(x.float() * inv_scale(s))


def integer_codes(x, scale, bits, signed, axis=None):
    """Clamped integer codes as int32: what an integer kernel multiplies."""
    qmin, qmax = qrange(bits, signed)
    return quant_codes(x, scale, bits, signed, axis).clamp(qmin, qmax).to(torch.int32)


def ste_mask(x, scale, bits, signed, axis=None):
    """True where the code is inside [qmin, qmax]: where the straight-through gradient passes."""
    qmin, qmax = qrange(bits, signed)
    q = quant_codes(x, scale, bits, signed, axis)
    return (q >= qmin) & (q <= qmax)


def fake_quant_forward(x, scale, bits, signed, axis=None):
    """y = clamp(round(x / s)) * s, same shape and dtype as x."""
    qmin, qmax = qrange(bits, signed)
    s = _broadcast_scale(scale, x, axis)
    return (quant_codes(x, scale, bits, signed, axis).clamp(qmin, qmax) * s).to(x.dtype)


def fake_quant_backward(grad_y, x, scale, bits, signed, axis=None, grad_factor=1.0):
    """Returns (grad_x [like x], grad_scale [like scale, float32])."""
    qmin, qmax = qrange(bits, signed)
    s = _broadcast_scale(scale, x, axis)
    q = quant_codes(x, scale, bits, signed, axis)
    inside = (q >= qmin) & (q <= qmax)
    g = grad_y.float()
    grad_x = torch.where(inside, g, torch.zeros_like(g)).to(x.dtype)
    ds = torch.where(q < qmin, torch.full_like(q, qmin), torch.where(q > qmax, torch.full_like(q, qmax),
                                                                      (q * s - x.float()) * inv_scale(s)))
    per_element = g * ds * grad_factor
    if axis is None:
        grad_scale = per_element.sum().reshape(scale.shape)
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        # sum(dim=[]) would reduce everything: a 1-D per-channel input has nothing to sum.
        grad_scale = (per_element.sum(dim=dims) if dims else per_element).reshape(scale.shape)
    return grad_x, grad_scale.float()


def quant_linear_forward(x, weight, bias, w_scale, a_scale, w_bits, a_bits, a_signed=True):
    """y = Qa(x) Qw(W)^T + b.  x [*, K], weight [M, K], w_scale [M], a_scale [1] -> [*, M].

    ``a_bits=None`` leaves the activations unquantized (weight-only quantization).
    """
    xq = x if a_bits is None else fake_quant_forward(x, a_scale, a_bits, a_signed)
    wq = fake_quant_forward(weight, w_scale, w_bits, True, axis=0)
    y = xq.float() @ wq.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quant_linear_backward(grad_y, x, weight, w_scale, a_scale, w_bits, a_bits, a_signed=True, w_grad_factor=1.0,
                          a_grad_factor=1.0, fisher=None, batch_dim=0):
    """Gradients of quant_linear.

    grad_y [*, M], x [*, K], weight [M, K].
    Returns (grad_x [*, K], grad_weight [M, K], grad_bias [M], grad_w_scale [M],
    grad_a_scale [1] or None when ``a_bits`` is None).
    When ``fisher`` [M, K] float32 is given, adds sum_n (mask_w * D_n^T Qa(X_n))^2 into it, with
    samples n along ``batch_dim`` of x / grad_y (the weight gradient of each sample, squared).
    """
    xq = (x if a_bits is None else fake_quant_forward(x, a_scale, a_bits, a_signed)).float()
    wq = fake_quant_forward(weight, w_scale, w_bits, True, axis=0).float()
    g = grad_y.float()
    grad_xq = g @ wq
    grad_wq = rows(g).t() @ rows(xq)
    if a_bits is None:
        grad_x, grad_a_scale = grad_xq, None
    else:
        grad_x, grad_a_scale = fake_quant_backward(grad_xq, x.float(), a_scale, a_bits, a_signed,
                                                   grad_factor=a_grad_factor)
    grad_w, grad_w_scale = fake_quant_backward(grad_wq, weight.float(), w_scale, w_bits, True, axis=0,
                                               grad_factor=w_grad_factor)
    if fisher is not None:
        mask = ste_mask(weight, w_scale, w_bits, True, axis=0)
        fisher += mask * per_sample_fisher(xq, g, batch_dim=batch_dim, dtype=fisher.dtype)
    grad_b = rows(g).sum(0)
    return (grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b, grad_w_scale, grad_a_scale)


def quant_matmul_forward(a, b, a_scale, b_scale, a_bits, b_bits, a_signed=True, b_signed=True):
    """Qa(a) @ Qb(b) with per-tensor scales.  a [*, M, K], b [*, K, N] -> [*, M, N]."""
    aq = fake_quant_forward(a, a_scale, a_bits, a_signed).float()
    bq = fake_quant_forward(b, b_scale, b_bits, b_signed).float()
    return (aq @ bq).to(a.dtype)


def quant_matmul_backward(grad_y, a, b, a_scale, b_scale, a_bits, b_bits, a_signed=True, b_signed=True,
                          a_grad_factor=1.0, b_grad_factor=1.0):
    """Returns (grad_a, grad_b, grad_a_scale [1], grad_b_scale [1])."""
    aq = fake_quant_forward(a, a_scale, a_bits, a_signed).float()
    bq = fake_quant_forward(b, b_scale, b_bits, b_signed).float()
    g = grad_y.float()
    grad_aq = g @ bq.transpose(-1, -2)
    grad_bq = aq.transpose(-1, -2) @ g
    # Broadcast batch dims of a or b were expanded in the product: sum them back.
    grad_aq = grad_aq.sum_to_size(a.shape)
    grad_bq = grad_bq.sum_to_size(b.shape)
    grad_a, grad_a_scale = fake_quant_backward(grad_aq, a.float(), a_scale, a_bits, a_signed,
                                               grad_factor=a_grad_factor)
    grad_b, grad_b_scale = fake_quant_backward(grad_bq, b.float(), b_scale, b_bits, b_signed,
                                               grad_factor=b_grad_factor)
    return grad_a.to(a.dtype), grad_b.to(b.dtype), grad_a_scale, grad_b_scale


def _samples(x, grad_out, batch_dim):
    """Per-sample [N, T, K] and [N, T, M] views (T = 1 for 2-D inputs)."""
    if x.dim() == 2:
        return x.unsqueeze(1), grad_out.unsqueeze(1)
    return x.movedim(batch_dim, 0), grad_out.movedim(batch_dim, 0)


def per_sample_fisher(x, grad_out, batch_dim=0, dtype=torch.float32):
    """sum_n (D_n^T X_n)^2 by a plain loop over samples.

    x [N, T, K] (or [T, N, K] with batch_dim=1, or [N, K]), grad_out [..., M] alike -> [M, K].
    """
    xs, ds = _samples(x, grad_out, batch_dim)
    out = torch.zeros(ds.shape[-1], xs.shape[-1], dtype=dtype, device=x.device)
    for xn, dn in zip(xs, ds):
        out += (dn.to(dtype).t() @ xn.to(dtype)).square()
    return out


def per_sample_sq_norms(x, grad_out, batch_dim=0, dtype=torch.float32):
    """||D_n^T X_n||_F^2 for each sample n -> [N]."""
    xs, ds = _samples(x, grad_out, batch_dim)
    return torch.stack([(dn.to(dtype).t() @ xn.to(dtype)).square().sum() for xn, dn in zip(xs, ds)])


def ms_deform_attn_forward(value, spatial_shapes, sampling_locations, attention_weights):
    """Multi-scale deformable attention core: per level ``F.grid_sample`` (bilinear, zeros
    outside, align_corners=False: 0 and 1 are the outer edges of the border pixels), then the
    samples weighted by the attention weights and summed over levels and points.

    value [N, S, M, D] (S = sum_l H_l W_l, levels concatenated row-major), spatial_shapes
    [(H_l, W_l)] * L (ints, or traced sizes while exporting), sampling_locations
    [N, Lq, M, L, P, 2] as (x, y) in [0, 1], attention_weights [N, Lq, M, L, P] -> [N, Lq, M * D].
    Differentiable twice through grid_sample: unlike the other references its backward is
    autograd's (``ms_deform_attn_backward``), which is also what double backward differentiates.
    """
    import torch.nn.functional as F

    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    # grid_sample's [-1, 1] (align_corners=False), in the values' dtype as it requires
    grids = (2 * sampling_locations - 1).to(value.dtype)
    sampled = []
    for level, ((h, w), level_value) in enumerate(zip(spatial_shapes,
                                                      value.split([h * w for h, w in spatial_shapes], 1))):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        level_value = level_value.permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [N*M, D, Lq, P]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [N*M, D, Lq]
    return out.view(n, m * d, lq).transpose(1, 2)


def ms_deform_attn_backward(grad_out, value, spatial_shapes, sampling_locations, attention_weights,
                            create_graph=False):
    """(grad_value, grad_locations, grad_weights) of ``ms_deform_attn_forward`` given grad_out
    [N, Lq, M * D], by autograd through it; with ``create_graph`` the gradients carry a graph
    to the inputs' own histories (double backward). An input that does not require grad while
    others do gets None."""
    inputs = (value, sampling_locations, attention_weights)
    with torch.enable_grad():
        if not create_graph:  # fresh leaves: only this core is differentiated
            inputs = tuple(t.detach().requires_grad_() for t in inputs)
        wanted = [t for t in inputs if t.requires_grad]
        out = ms_deform_attn_forward(inputs[0], spatial_shapes, inputs[1], inputs[2])
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=create_graph))
    return tuple(next(grads) if t.requires_grad else None for t in inputs)
