"""Fisher-trace regulariser: its gradient is right and it changes the update."""
import pytest
import torch
from torch import nn

import fqkernels as fk

from fqdetr.quant import QuantConfig, quantize_model, quantized_weights
from fqdetr.regularize import FisherTraceRegularizer


def _toy(quantized, a_bits=8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    if quantized:
        model = quantize_model(model, QuantConfig(w_bits=4, a_bits=a_bits))
    model = model.double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    if quantized:
        with fk.differentiable():  # float64 runs only through the compositions
            model(x)  # initialise activation scales on this data
    return model, x, y


def _loss_fn(model, x, y):
    def loss(reduction):
        per_image = nn.functional.cross_entropy(model(x), y, reduction="none")
        return per_image.sum() if reduction == "batch" else per_image
    return loss


def _regularizer(model, estimator, method, fd_eps=1e-3):
    weights = quantized_weights(model)
    if weights:
        params, quantizers = zip(*weights.values())
    else:
        params, quantizers = [p for n, p in model.named_parameters() if n.endswith("weight")], None
    return FisherTraceRegularizer(params, estimator, method, fd_eps=fd_eps, quantizers=quantizers)


@pytest.mark.parametrize("estimator", ["batch", "per-sample"])
def test_exact_gradient_matches_finite_differences_of_R(estimator):
    model, x, y = _toy(quantized=False)
    reg = _regularizer(model, estimator, "exact")
    R = reg(_loss_fn(model, x, y))
    grads = torch.autograd.grad(R, reg.params)
    # Central differences of R in float64 along random directions: truncation O(h^2) ~1e-10
    # relative, so agreement to 1e-6 tests the double backward itself.
    h = 1e-5
    for _ in range(3):
        dirs = [torch.randn_like(p) for p in reg.params]
        with torch.no_grad():
            for p, d in zip(reg.params, dirs):
                p.add_(d, alpha=h)
        r_plus = reg(_loss_fn(model, x, y)).item()
        with torch.no_grad():
            for p, d in zip(reg.params, dirs):
                p.add_(d, alpha=-2 * h)
        r_minus = reg(_loss_fn(model, x, y)).item()
        with torch.no_grad():
            for p, d in zip(reg.params, dirs):
                p.add_(d, alpha=h)
        fd = (r_plus - r_minus) / (2 * h)
        analytic = sum((g * d).sum() for g, d in zip(grads, dirs)).item()
        assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("estimator", ["batch", "per-sample"])
def test_finite_difference_method_matches_exact(quantized, estimator):
    # With weight quantizers both methods differentiate through the same straight-through
    # estimator; the forward difference has O(eps) error, hence 1e-3 relative. float64
    # needs the compositions, so the finite-difference forward runs inside them too.
    # Activations stay float here: a finite difference cannot see curvature carried through
    # a downstream activation quantizer (its codes do not move for a small step), which
    # the exact method's straight-through double backward does include.
    model, x, y = _toy(quantized, a_bits=None)
    exact = _regularizer(model, estimator, "exact")
    fd = _regularizer(model, estimator, "finite-difference", fd_eps=1e-6)
    r_exact = exact(_loss_fn(model, x, y))
    g_exact = torch.autograd.grad(r_exact, exact.params)
    with fk.differentiable():
        r_fd = fd(_loss_fn(model, x, y))
    assert r_fd.item() == pytest.approx(r_exact.item(), rel=1e-9)
    g_fd = torch.autograd.grad(r_fd, fd.params)
    for a, b in zip(g_exact, g_fd):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6 * a.abs().max().item())


@pytest.mark.parametrize("method", ["exact", "finite-difference"])
def test_one_regularised_step_lowers_R(method):
    # float32 through the fused kernels (finite-difference) or the compositions (exact).
    model, x, y = _toy(quantized=True)
    model, x = model.float(), x.float()
    reg = _regularizer(model, "batch", method)
    loss_fn = _loss_fn(model, x, y)
    r0 = reg(loss_fn)
    r0.backward()
    with torch.no_grad():
        for p in reg.params:
            p -= 0.05 * p.grad / (p.grad.norm() + 1e-12)
    assert reg(loss_fn).item() < r0.item()


def test_quantized_model_has_nonzero_regulariser_gradient_in_float32():
    model, x, y = _toy(quantized=True)
    model = model.float()
    for method in ("exact", "finite-difference"):
        reg = _regularizer(model, "batch", method)
        grads = torch.autograd.grad(reg(_loss_fn(model, x.float(), y)), reg.params)
        assert all(g.abs().sum() > 0 for g in grads)
        assert all(q.offset is None for q in reg.quantizers)  # perturbations removed


def test_bad_arguments():
    with pytest.raises(ValueError, match="estimator"):
        FisherTraceRegularizer([nn.Parameter(torch.ones(1))], estimator="token")
    with pytest.raises(ValueError, match="method"):
        FisherTraceRegularizer([nn.Parameter(torch.ones(1))], method="approx")
    with pytest.raises(ValueError, match="params"):
        FisherTraceRegularizer([torch.ones(1)])


def test_default_per_sample_R_is_the_fisher_collectors_trace():
    """R = 1/B sum_n ||d l_n / dW||^2 over the quantized weights: the sum over layers of the
    traces the Fisher collector accumulates on the same batch (docs/METHOD.md section 4.2)."""
    from fqdetr.fisher import FisherCollector
    model, x, y = _toy(quantized=True)
    model, x = model.float(), x.float()
    model(x)
    with FisherCollector(model) as fc:
        fc.backward(_loss_fn(model, x, y)("per_image"))
    weights, quantizers = zip(*quantized_weights(model).values())
    reg = FisherTraceRegularizer(weights, quantizers=quantizers)
    assert reg.estimator == "per-sample"
    assert reg(_loss_fn(model, x, y)).item() == pytest.approx(sum(fc.traces().values()), rel=1e-5)


def test_per_image_forward_passes_give_the_same_R_and_gradient():
    """reg(loss_fn, image_loss, B): each image's backward pass through its own forward pass
    gives the batch path's R and dR/dW (the toy's images do not interact)."""
    model, x, y = _toy(quantized=True)
    reg = _regularizer(model, "per-sample", "exact")
    batch_R = reg(_loss_fn(model, x, y))
    batch_grads = torch.autograd.grad(batch_R, reg.params)
    calls = []

    def image_loss(n):
        calls.append(n)
        return nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1])

    R = reg(_loss_fn(model, x, y), image_loss, len(y))
    assert calls == list(range(len(y)))
    assert R.item() == pytest.approx(batch_R.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(R, reg.params), batch_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="num_images"):
        reg(_loss_fn(model, x, y), image_loss, 0)
