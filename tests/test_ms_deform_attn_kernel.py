"""fqkernels.ms_deform_attn: the C++ deformable attention core (csrc/cpu/ms_deform_attn.cpp)
against the grid_sample reference, forward and all three gradients, on odd shapes; gradcheck of
the kernel's backward; double backward; bad input; thread-count independence."""
import pytest
import torch

import fqkernels as fk
from fqkernels import _ext, reference
from fqkernels.ms_deform_attn import MsDeformAttnFunction

pytestmark = pytest.mark.skipif(_ext._cpu is None, reason="fqkernels._cpu is not built")

# (N, Lq, M, D, P, spatial shapes): levels of different odd sizes, 1-pixel levels and rows,
# Lq = 1 and odd, M = 1 / 3, D = 1 / 5 / 16 (16 crosses the kernel's 8-lane dot), P = 1 / 3.
CASES = [
    (1, 1, 1, 1, 1, [(5, 7)]),
    (2, 7, 3, 5, 3, [(5, 7), (3, 2), (1, 1)]),
    (2, 5, 1, 16, 3, [(7, 3), (2, 5)]),
    (1, 3, 3, 16, 1, [(1, 9), (4, 1), (3, 3)]),
    (2, 1, 3, 1, 3, [(3, 5), (1, 1)]),
]


def make_inputs(n, lq, m, d, points, shapes, dtype=torch.float64, low=-0.3, high=1.3, seed=0):
    """value, locations (in [low, high]: partly outside [0, 1] by default, reading zeros there),
    weights; all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    locations = torch.rand(n, lq, m, len(shapes), points, 2, generator=g, dtype=dtype) * (high - low) + low
    weights = torch.rand(n, lq, m, len(shapes), points, generator=g, dtype=dtype)
    if low < 0:  # at least one sample straddles the left border: one neighbour column reads zeros
        locations[0, 0, 0, 0, 0, 0] = -0.25 / shapes[0][1]
    return tuple(t.requires_grad_() for t in (value, locations, weights))


def forward_and_grads(backend, inputs, shapes, grad_out):
    out = fk.ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2], backend=backend)
    return (out, *torch.autograd.grad(out, inputs, grad_out))


def assert_matches_reference(inputs, shapes, **tolerance):
    grad_out = torch.randn(inputs[0].shape[0], inputs[1].shape[1], inputs[0].shape[2] * inputs[0].shape[3],
                           dtype=inputs[0].dtype)
    got = forward_and_grads("cpu", inputs, shapes, grad_out)
    want = forward_and_grads("reference", inputs, shapes, grad_out)
    for name, a, b in zip(("out", "grad_value", "grad_locations", "grad_weights"), got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tolerance)


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_the_reference_float64(case):
    inputs = make_inputs(*case)
    # Same corners and weights as grid_sample (same arithmetic, kernel comment); only the
    # summation order differs: float64 rounding of sums of <= 4 L P D terms of size ~1-10.
    assert_matches_reference(inputs, case[-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_the_reference_float32(case):
    inputs = tuple(t.detach().float().requires_grad_() for t in make_inputs(*case))
    # float32 rounding of the same sums in another order: grad_locations sums D dot products
    # times W_l <= 9, of magnitude ~10, so ~1e-6 * 10 * 9 absolute.
    assert_matches_reference(inputs, case[-1], rtol=1e-5, atol=1e-4)


def test_samples_on_pixel_centres_edges_and_the_map_border():
    """x = loc W - 0.5 exactly integral (centres: one corner weight 1) or half-integral (edges
    between pixels, 0 and 1 = the map's outer edges, where one side reads zero): the corners and
    the one-sided derivatives there are the reference's (floor picks the same cell)."""
    shapes = [(3, 5), (2, 1)]
    value, _, weights = make_inputs(1, 12, 1, 3, 2, shapes)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.5, 5.0, -0.5, 5.5, 0.25], dtype=torch.float64)
    locations = torch.empty(1, 12, 1, 2, 2, 2, dtype=torch.float64)
    locations[..., 0] = (grid / 5).view(1, 12, 1, 1, 1)  # in fifths of the width: centres at k + 0.5
    locations[..., 1] = (grid.flip(0) / 3).view(1, 12, 1, 1, 1)
    assert_matches_reference((value, locations.requires_grad_(), weights), shapes, rtol=1e-12, atol=1e-12)


def test_samples_outside_the_map_read_zero_and_have_zero_gradients():
    shapes = [(3, 4), (1, 2)]
    value, locations, weights = make_inputs(2, 3, 2, 5, 2, shapes)
    with torch.no_grad():  # more than one pixel beyond every side: no neighbour inside
        locations[..., 0].copy_(torch.where(locations[..., 0] > 0.5, 2.6, -1.6))
        locations[:, 0, ..., 1] = float("nan")  # no neighbour either
    out, *grads = forward_and_grads("cpu", (value, locations, weights), shapes, torch.ones(2, 3, 10))
    assert not out.any() and not any(g.any() for g in grads)


def test_gradcheck_of_the_kernel_backward(monkeypatch):
    """Finite differences in float64 against the C++ backward: the reference's backward is
    replaced by an error, so the kernel's is the one checked. Locations stay inside the map and
    random, so no finite-difference step crosses a cell edge (bilinear has kinks there)."""
    def no_reference(*args, **kwargs):
        raise AssertionError("the reference backward ran")

    monkeypatch.setattr(reference, "ms_deform_attn_backward", no_reference)
    shapes = [(3, 5), (2, 1)]
    inputs = make_inputs(2, 3, 3, 2, 3, shapes, low=0.05, high=0.95)
    assert torch.autograd.gradcheck(lambda *t: MsDeformAttnFunction.apply(*t, shapes, "cpu"), inputs)


def test_double_backward_equals_the_references():
    """create_graph=True differentiates the reference recomputed on the saved inputs: the
    second derivatives of a gradient penalty equal the all-reference ones."""
    shapes = [(5, 7), (3, 2), (1, 1)]
    inputs = make_inputs(2, 4, 3, 5, 3, shapes)

    def second_derivatives(backend):
        out = fk.ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2], backend=backend)
        grads = torch.autograd.grad((out ** 2).sum(), inputs, create_graph=True)
        penalty = sum((g ** 2).sum() for g in grads)
        return torch.autograd.grad(penalty, inputs)

    for got, want in zip(second_derivatives("cpu"), second_derivatives("reference")):
        # the same grid_sample graph both times; the first-order out differs by summation order
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    small = make_inputs(1, 2, 1, 2, 2, [(3, 2), (1, 3)], low=0.05, high=0.95)
    assert torch.autograd.gradgradcheck(lambda *t: fk.ms_deform_attn(t[0], [(3, 2), (1, 3)], t[1], t[2],
                                                                     backend="cpu"), small)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_result_does_not_depend_on_the_thread_count(threads):
    """The backward's scatter is split over (n, m) pairs, each summed in a fixed order by one
    thread: bit-identical results for any thread count (the work is above the kernel's
    single-thread threshold)."""
    shapes = [(9, 11), (5, 6), (3, 3)]
    inputs = tuple(t.detach().float().requires_grad_() for t in make_inputs(2, 60, 4, 16, 4, shapes))
    grad_out = torch.randn(2, 60, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = forward_and_grads("cpu", inputs, shapes, grad_out)
        torch.set_num_threads(threads)
        got = forward_and_grads("cpu", inputs, shapes, grad_out)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_bad_input_is_refused_with_the_argument_named():
    shapes = [(3, 4), (1, 2)]
    value, locations, weights = (t.detach() for t in make_inputs(1, 2, 2, 3, 2, shapes, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"spatial_shapes: .* S = 14"):
        fk.ms_deform_attn(value, [(3, 4)], locations[:, :, :, :1], weights[:, :, :, :1])
    with pytest.raises(ValueError, match="spatial_shapes: expected positive"):
        fk.ms_deform_attn(value, [(0, 4), (7, 2)], locations, weights)
    with pytest.raises(ValueError, match=r"sampling_locations: expected shape \[1, 2, 2, 2, 2, 2\]"):
        fk.ms_deform_attn(value, shapes, locations[:, :, :1], weights)
    with pytest.raises(ValueError, match=r"attention_weights: expected shape \[1, 2, 2, 2, 2\]"):
        fk.ms_deform_attn(value, shapes, locations, weights[..., :1])
    with pytest.raises(ValueError, match="value: expected 4 dimensions"):
        fk.ms_deform_attn(value[0], shapes, locations, weights)
    with pytest.raises(TypeError, match="attention_weights: expected dtype"):
        fk.ms_deform_attn(value, shapes, locations, weights.to(torch.int32))


def test_the_bindings_check_every_tensor():
    """The C++ entry points refuse what the Python op never passes them (mixed dtypes,
    strided views, wrong output shapes), naming the argument."""
    shapes = [(3, 4), (1, 2)]
    value, locations, weights = (t.detach().float() for t in make_inputs(1, 2, 2, 3, 2, shapes))
    out = torch.empty(1, 2, 6)
    cpu, dl = _ext._cpu, _ext.dl
    with pytest.raises(TypeError, match="attention_weights: expected the dtype of value"):
        cpu.ms_deform_attn_forward(dl(value), shapes, dl(locations), dl(weights.double()), dl(out))
    with pytest.raises(ValueError, match="sampling_locations: expected a contiguous tensor"):
        cpu.ms_deform_attn_forward(dl(value), shapes, dl(locations.transpose(1, 2)), dl(weights), dl(out))
    with pytest.raises(ValueError, match=r"out: expected shape \[1, 2, 6\]"):
        cpu.ms_deform_attn_forward(dl(value), shapes, dl(locations), dl(weights), dl(out[:, :1]))
    with pytest.raises(ValueError, match="spatial_shapes: expected sum"):
        cpu.ms_deform_attn_forward(dl(value), [(3, 4), (1, 1)], dl(locations), dl(weights), dl(out))
    grads = [torch.empty_like(t) for t in (value, locations, weights)]
    with pytest.raises(ValueError, match="grad_locations: expected shape"):
        cpu.ms_deform_attn_backward(dl(out), dl(value), shapes, dl(locations), dl(weights), dl(grads[0]),
                                    dl(grads[2]), dl(grads[2]))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")  # ONNX export still traces with it
def test_other_dtypes_and_tracing_take_the_reference():
    """bfloat16 has no kernel, and jit tracing (ONNX export) must record grid_sample."""
    shapes = [(3, 4), (1, 2)]
    value, locations, weights = (t.detach() for t in make_inputs(1, 2, 2, 3, 2, shapes, dtype=torch.float32))
    half = fk.ms_deform_attn(value.bfloat16(), shapes, locations.bfloat16(), weights.bfloat16())
    torch.testing.assert_close(half, reference.ms_deform_attn_forward(value.bfloat16(), shapes, locations.bfloat16(),
                                                                      weights.bfloat16()))
    graph = torch.jit.trace(lambda v, loc, w: fk.ms_deform_attn(v, shapes, loc, w), (value, locations, weights)).graph
    assert "aten::grid_sampler" in str(graph)
