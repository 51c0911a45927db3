"""The reference quant_linear / quant_matmul / per-sample Fisher against autograd
through torch's own fake-quant ops and torch.func (independent oracles)."""
import pytest
import torch
import torch.nn.functional as F

import fqkernels as fk
from fqkernels import reference


def _torch_fq(x, s, bits, signed, axis=None):
    qmin, qmax = reference.qrange(bits, signed)
    if axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(x, s, torch.zeros(1), qmin, qmax, 1.0)
    return torch._fake_quantize_learnable_per_channel_affine(x, s, torch.zeros(s.numel()), axis, qmin, qmax, 1.0)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


# Gradients are sums over up to a few hundred fp32 products, computed in different orders
# by the two paths: agreement to ~1e-5 relative, plus an absolute floor for near-zero sums.
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("w_bits, a_bits, a_signed", [(2, 8, True), (4, 8, False), (8, 3, True), (5, 2, False)])
def test_quant_linear_reference_gradients(w_bits, a_bits, a_signed):
    x = torch.randn(3, 7, 33)
    if not a_signed:
        x = x.relu()
    w, b = torch.randn(13, 33) * 0.2, torch.randn(13)
    ws, as_ = torch.rand(13) * 0.05 + 0.01, torch.tensor([0.08])
    xl, wl, bl, wsl, asl = _leaves(x, w, b, ws, as_)
    y = F.linear(_torch_fq(xl, asl, a_bits, a_signed), _torch_fq(wl, wsl, w_bits, True, axis=0), bl)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(reference.quant_linear_forward(x, w, b, ws, as_, w_bits, a_bits, a_signed),
                               y.detach(), **TOL)
    dx, dw, db, dws, das = reference.quant_linear_backward(g, x, w, ws, as_, w_bits, a_bits, a_signed)
    for got, want in [(dx, xl.grad), (dw, wl.grad), (db, bl.grad), (dws, wsl.grad), (das, asl.grad)]:
        torch.testing.assert_close(got, want, **TOL)


def test_quant_linear_public_op_autograd_and_fisher():
    x, w = torch.randn(4, 5, 9), torch.randn(6, 9)
    xl, wl = _leaves(x, w)
    fisher = torch.zeros(6, 9)
    y = fk.quant_linear(xl, wl, None, w_scale=0.05, a_scale=0.1, w_bits=4, a_bits=8, fisher=fisher)
    g = torch.randn_like(y)
    y.backward(g)
    _, dw, _, _, _ = reference.quant_linear_backward(g, x, w, torch.full((6,), 0.05), torch.tensor([0.1]), 4, 8)
    torch.testing.assert_close(wl.grad, dw, **TOL)
    # Per-sample Fisher of the weight: autograd per sample, squared and summed.
    expected = torch.zeros(6, 9)
    for n in range(4):
        wn = w.clone().requires_grad_()
        yn = fk.quant_linear(x[n:n + 1], wn, None, w_scale=0.05, a_scale=0.1, w_bits=4, a_bits=8)
        yn.backward(g[n:n + 1])
        expected += wn.grad.square()
    torch.testing.assert_close(fisher, expected, **TOL)


@pytest.mark.parametrize("a_bits, b_bits, b_signed", [(8, 8, True), (3, 5, False), (2, 7, True)])
def test_quant_matmul_reference_gradients(a_bits, b_bits, b_signed):
    a, b = torch.randn(2, 3, 7, 33), torch.randn(3, 33, 5)  # batch dims broadcast
    if not b_signed:
        b = b.abs()
    s_a, s_b = torch.tensor([0.1]), torch.tensor([0.07])
    al, bl, sal, sbl = _leaves(a, b, s_a, s_b)
    y = _torch_fq(al, sal, a_bits, True) @ _torch_fq(bl, sbl, b_bits, b_signed)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(reference.quant_matmul_forward(a, b, s_a, s_b, a_bits, b_bits, True, b_signed),
                               y.detach(), **TOL)
    grads = reference.quant_matmul_backward(g, a, b, s_a, s_b, a_bits, b_bits, True, b_signed)
    for got, want in zip(grads, [al.grad, bl.grad, sal.grad, sbl.grad]):
        torch.testing.assert_close(got, want, **TOL)
    out = fk.quant_matmul(al.detach(), bl.detach(), s_a, s_b, a_bits, b_bits, True, b_signed)
    torch.testing.assert_close(out, y.detach(), **TOL)


@pytest.mark.parametrize("shape, batch_dim", [((5, 9), 0), ((4, 7, 9), 0), ((7, 4, 9), 1), ((3, 1, 9), 0)])
def test_per_sample_fisher_reference_against_torch_func(shape, batch_dim):
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(6, 9, dtype=torch.float64)
    target = torch.randn(*shape[:-1], 6, dtype=torch.float64)

    def loss(weight, xn, tn):  # one sample's loss
        return ((xn @ weight.t() - tn) ** 2).sum()

    xs, ts = (x, target) if x.dim() == 2 or batch_dim == 0 else (x.movedim(1, 0), target.movedim(1, 0))
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, xs, ts)
    grad_out = 2 * (x @ w.t() - target)  # d(sum of losses)/d(output)
    fisher = reference.per_sample_fisher(x, grad_out, batch_dim=batch_dim, dtype=torch.float64)
    torch.testing.assert_close(fisher, per_sample.square().sum(0), rtol=1e-10, atol=1e-10)
    norms = reference.per_sample_sq_norms(x, grad_out, batch_dim=batch_dim, dtype=torch.float64)
    torch.testing.assert_close(norms, per_sample.square().sum((1, 2)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fk.quant_linear(torch.randn(2, 5), torch.randn(3, 4), w_scale=0.1, a_scale=0.1), ValueError, "x"),
        (lambda: fk.quant_linear(torch.randn(2, 4), torch.randn(3, 4), w_scale=torch.ones(2), a_scale=0.1),
         ValueError, "w_scale"),
        (lambda: fk.quant_linear(torch.randn(2, 4), torch.randn(3, 4), w_scale=0.1, a_scale=0.1, w_bits=1),
         ValueError, "w_bits"),
        (lambda: fk.quant_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4), w_scale=0.1, a_scale=0.1),
         ValueError, "bias"),
        (lambda: fk.quant_linear(torch.randn(2, 4), torch.randn(3, 4), w_scale=0.1, a_scale=float("nan")),
         ValueError, "a_scale"),
        (lambda: fk.quant_linear(torch.randn(2, 4), torch.randn(3, 4), w_scale=0.1, a_scale=0.1,
                                 fisher=torch.zeros(4, 3)), ValueError, "fisher"),
        (lambda: fk.quant_matmul(torch.randn(2, 3), torch.randn(4, 2), 0.1, 0.1), ValueError, "b"),
        (lambda: fk.quant_matmul(torch.randn(2, 3), torch.randn(3, 2).double(), 0.1, 0.1), TypeError, "b"),
        (lambda: fk.per_sample_fisher(torch.randn(2, 3, 4), torch.randn(2, 4, 5)), ValueError, "grad_out"),
        (lambda: fk.per_sample_fisher(torch.randn(2, 4), torch.randn(2, 5), batch_dim=1), ValueError, "batch_dim"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
