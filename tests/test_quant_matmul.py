"""quant_matmul: every available backend against the reference, forward and gradients
(both scales), batched and broadcast shapes, signed and unsigned operands, bad input.
Triton runs under TRITON_INTERPRET=1 on CPU tensors."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch

import fqkernels as fk
from test_quant_linear import device_for

EPS = 2.0**-24
AVAILABLE = fk.available_backends()
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(b not in AVAILABLE, reason=f"backend {b!r} unavailable"))
            for b in ("cpu", "triton", "cuda")]

# (a shape, b shape, a_bits, b_bits, a_signed, b_signed): Q K^T (signed x signed), A V
# (unsigned probabilities x signed), broadcast batch dims, odd sizes, every bit-width.
CASES = [
    ((7, 33), (33, 1), 8, 8, True, True),
    ((2, 7, 33), (2, 33, 7), 2, 3, True, True),
    ((3, 1, 7, 5), (2, 5, 33), 4, 5, False, True),
    ((2, 33, 7), (7, 33), 6, 7, True, False),
    ((1, 130, 7), (1, 7, 7), 8, 8, False, True),
]


def _run(backend, a, b, sa, sb, case, grad_y):
    dev = device_for(backend)
    # fresh leaves (t.to(dev) on t's own device is t itself): the reference's backward must not
    # accumulate into, and alias, the gradients of the backend it is compared with
    a, b, sa, sb = (t.detach().clone().to(dev).requires_grad_() for t in (a, b, sa, sb))
    y = fk.quant_matmul(a, b, sa, sb, *case[2:], a_grad_factor=0.5, b_grad_factor=2.0, backend=backend)
    y.backward(grad_y.to(dev))
    return tuple(t.cpu() for t in (y.detach(), a.grad, b.grad, sa.grad, sb.grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_backend_matches_reference(backend, case):
    a_shape, b_shape, a_bits, b_bits, a_signed, b_signed = case
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    if not a_signed:
        a = a.abs()
    if not b_signed:
        b = b.abs()
    _compare_with_reference(backend, a, b, case)


# Every bit-width of both operands in every sign combination, on one small odd shape.
BIT_CASES = [((3, 7), (7, 5), bits, bits, a_signed, b_signed)
             for bits in range(2, 9) for a_signed in (True, False) for b_signed in (True, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BIT_CASES)
def test_every_bit_width_and_sign_on_a_small_shape(backend, case):
    a, b = torch.randn(case[0]), torch.randn(case[1])
    _compare_with_reference(backend, a if case[4] else a.abs(), b if case[5] else b.abs(), case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_key_attention(backend):
    """Q K^T with one key: K^T of k [B, 1, D] is a contiguous [B, D, 1] view whose size-1
    dimension has a non-canonical stride, which DLPack passes on as it is."""
    q, k = torch.randn(2, 7, 33), torch.randn(2, 1, 33)
    _compare_with_reference(backend, q, k.transpose(1, 2), ((2, 7, 33), (2, 33, 1), 8, 8, True, True))


def _compare_with_reference(backend, a, b, case):
    a_bits, b_bits = case[2], case[3]
    sa, sb = torch.tensor([2.0 / 2**a_bits]), torch.tensor([2.5 / 2**b_bits])
    grad_y = torch.randn(torch.matmul(a, b).shape)
    got = _run(backend, a, b, sa, sb, case, grad_y)
    ref = _run("reference", a, b, sa, sb, case, grad_y)
    K = a.shape[-1]
    mag = (a.abs().max() * b.abs().max()).item() * K
    # Forward: two float32 (or one exact integer) products of the same quantized operands,
    # each within (K + 2) roundoffs of sum |a_i b_i| <= mag.
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=2 * (K + 2) * EPS * mag)
    # Gradients: GEMMs over N (grad_a) and M plus broadcast sums (grad_b), same masks;
    # scale gradients: sums of every element's term, relative 1e-4 of their magnitudes.
    for g_got, g_ref in zip(got[1:3], ref[1:3]):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-4 * g_ref.abs().max().item())
    for s_got, s_ref, grad in ((got[3], ref[3], ref[1]), (got[4], ref[4], ref[2])):
        torch.testing.assert_close(s_got, s_ref, rtol=1e-4, atol=1e-4 * (grad.abs().sum().item() + 1))


def test_bad_inputs_raise_named_errors():
    a, b = torch.randn(2, 4, 8), torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match="b: expected 8 rows"):
        fk.quant_matmul(a, torch.randn(2, 7, 3), 0.1, 0.1)
    with pytest.raises(TypeError, match="b: expected the dtype of a"):
        fk.quant_matmul(a, b.bfloat16(), 0.1, 0.1)
    with pytest.raises(ValueError, match="a_scale"):
        fk.quant_matmul(a, b, torch.tensor([0.1, 0.2]), 0.1)
    with pytest.raises(ValueError, match="b_bits"):
        fk.quant_matmul(a, b, 0.1, 0.1, b_bits=1)
