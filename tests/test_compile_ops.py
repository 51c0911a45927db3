"""torch.compile(fullgraph=True) (inductor, CPU) and torch.export of the public ops: forward
and backward match eager on contiguous and non-contiguous inputs, the scale value check
survives compilation as a runtime assert, and outputs can be edited in place like
nn.Linear's. Shapes are small: every test pays one inductor compile. Last, the import
structure of the op layer (no cycle, no op module importing another)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch

import fqkernels as fk


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _compare(fn, inputs, grad_seed=0):
    """Runs fn eagerly and compiled on copies of ``inputs``; asserts equal outputs and gradients."""
    compiled = torch.compile(fn, fullgraph=True, backend="inductor", dynamic=False)
    results = []
    for f in (fn, compiled):
        leaves = _leaves(*inputs)
        # Views of the leaves (transposes) are made inside, so non-contiguous inputs reach the op.
        y = f(*leaves)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)))
        results.append((y.detach(), *[t.grad for t in leaves]))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)
    return results[1]


@pytest.mark.parametrize("scale_kind", ["float", "tensor", "per_channel"])
@pytest.mark.parametrize("transposed", [False, True])
def test_fake_quant_compiles_forward_and_backward(scale_kind, transposed):
    x = torch.randn(6, 10) * 2
    if scale_kind == "float":
        def fn(x):
            return fk.fake_quant(x.t() if transposed else x, 0.3, 4) * 2
        _compare(fn, [x])
        return
    axis = 1 if scale_kind == "per_channel" else None
    scale = torch.rand(6 if transposed else 10) * 0.3 + 0.1 if axis is not None else torch.tensor([0.3])

    def fn(x, s):
        # "* 2" after the op: inductor fuses a kernel that reads the op's output by its strides.
        return fk.fake_quant(x.t() if transposed else x, s, 4, axis=axis, grad_factor=0.5) * 2
    _, _, grad_s = _compare(fn, [x, scale])
    assert grad_s.abs().sum() > 0  # the LSQ scale gradient went through the compiled backward


def test_quant_linear_compiles_with_non_contiguous_operands():
    x = torch.randn(3, 5, 12)
    w, b = torch.randn(7, 12) * 0.5, torch.randn(7)
    ws, a_s = torch.rand(7) * 0.1 + 0.05, torch.tensor([0.05])

    def fn(x, w, b, ws, a_s):
        # x.transpose(0, 1): [5, 3, 12] non-contiguous; w.t().t() keeps a contiguous weight.
        return fk.quant_linear(x.transpose(0, 1), w, b, ws, a_s, w_bits=4, a_bits=8).relu()
    out = _compare(fn, [x, w, b, ws, a_s])
    assert out[0].shape == (5, 3, 7) and all(g is not None and g.abs().sum() > 0 for g in out[1:])


def test_quant_matmul_compiles_with_non_contiguous_operands():
    a, bt = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    a_scale, b_scale = torch.tensor([0.05]), torch.tensor([0.02])

    def fn(a, bt, a_scale, b_scale):
        return fk.quant_matmul(a, bt.transpose(-1, -2), a_scale, b_scale, 8, 4) + 1
    out = _compare(fn, [a, bt, a_scale, b_scale])
    assert out[0].shape == (2, 5, 6) and out[4].abs().sum() > 0


def test_compiled_scale_check_raises_at_run_time():
    compiled = torch.compile(lambda x, s: fk.fake_quant(x, s, 4), fullgraph=True, dynamic=False)
    x = torch.randn(4)
    torch.testing.assert_close(compiled(x, torch.tensor([0.5])), fk.fake_quant(x, 0.5, 4))
    with pytest.raises(RuntimeError, match="scale: expected finite positive"):
        compiled(x, torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="scale: expected finite positive"):  # eager: the clear error
        fk.fake_quant(x, torch.tensor([float("nan")]), 4)


class _QuantHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 6))
        self.w_scale = torch.nn.Parameter(torch.full((4,), 0.2))
        self.a_scale = torch.nn.Parameter(torch.tensor([0.1]))

    def forward(self, x):
        return fk.quant_linear(x, self.weight, None, self.w_scale, self.a_scale, w_bits=4, a_bits=8)


def test_export_of_a_module_calling_quant_linear():
    model, x = _QuantHead(), torch.randn(2, 3, 6)
    exported = torch.export.export(model, (x,))
    assert any("quant_linear_forward" in str(n.target) for n in exported.graph.nodes)
    other = torch.randn(2, 3, 6)
    torch.testing.assert_close(exported.module()(other), model(other), rtol=0, atol=0)


def _box_head(linear, x, ref):
    """Deformable DETR's box refinement: the layer output is edited in place."""
    out = linear(x)
    out[..., :2] += ref
    return out.sigmoid()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_quant_linear_output_can_be_edited_in_place(backend):
    if backend not in fk.available_backends():
        pytest.skip(f"backend {backend!r} unavailable")
    x, w, ws = torch.randn(2, 5, 8), torch.randn(4, 8), torch.rand(4) * 0.1 + 0.05
    ref_points = torch.randn(2, 5, 2)
    grads = []
    for name in (backend, "reference"):
        xl, wl, wsl, rl = _leaves(x, w, ws, ref_points)
        _box_head(lambda t: fk.quant_linear(t, wl, None, wsl, 0.05, w_bits=4, a_bits=8, backend=name), xl,
                  rl).sum().backward()
        grads.append((xl.grad, wl.grad, wsl.grad, rl.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_quant_linear_module_output_can_be_edited_in_place(monkeypatch):
    from fqdetr.quant.modules import QuantLinear

    layer = QuantLinear.from_float(torch.nn.Linear(8, 4))
    x, ref_points = torch.randn(2, 5, 8), torch.randn(2, 5, 2)
    with torch.no_grad():
        layer(x)  # quantizers that initialise their scales from the first batch do it here
    grads = []
    for backend in (fk.backend_for("quant_linear", x), "reference"):
        monkeypatch.setenv("FQ_BACKEND", backend)
        layer.zero_grad()
        xl, rl = _leaves(x, ref_points)
        _box_head(layer, xl, rl).sum().backward()
        grads.append([xl.grad, rl.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 2
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ import structure of the op layer
OP_MODULES = {"fqkernels.fake_quant", "fqkernels.quant_linear", "fqkernels.quant_matmul", "fqkernels.fisher"}


def _fqkernels_imports():
    """{module: set of fqkernels modules it imports anywhere in its file (lazy imports too)}."""
    import ast
    import pathlib

    root = pathlib.Path(fk.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        module = ".".join(("fqkernels", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("fqkernels")}
            elif isinstance(node, ast.ImportFrom) and node.module == "fqkernels":  # its submodules
                edges |= {f"fqkernels.{a.name}" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fqkernels."):
                edges.add(node.module)
        graph[module] = edges - {module}
    return graph


def test_fqkernels_has_no_import_cycle_and_op_modules_import_no_other_op():
    graph = _fqkernels_imports()
    assert {"fqkernels.quant_linear", "fqkernels.util", "fqkernels.triton.launch"} <= graph.keys()
    for op in OP_MODULES:
        assert not graph[op] & (OP_MODULES | {"fqkernels"}), f"{op} imports {graph[op] & OP_MODULES}"
    state = {}  # depth-first search: 1 on the current path, 2 done

    def visit(module, path):
        state[module] = 1
        for dep in graph.get(module, ()):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2
    for module in graph:
        if module not in state and module != "fqkernels":  # the package imports its modules by design
            visit(module, [module])


def test_gemm_custom_ops_pass_opcheck_on_non_contiguous_inputs():
    """Schema, fake implementation (shapes and strides) and aliasing of the quant_linear and
    quant_matmul custom ops agree with what the kernels return."""
    from fqkernels.quant_linear import quant_linear_backward_op, quant_linear_forward_op
    from fqkernels.quant_matmul import quant_matmul_backward_op, quant_matmul_forward_op

    x, w = torch.randn(6, 5).t(), torch.randn(4, 6)  # x [5, 6] transposed
    ws, a_s = torch.rand(4) * 0.1 + 0.05, torch.tensor([0.05])
    backend = fk.backend_for("quant_linear", x)
    torch.library.opcheck(quant_linear_forward_op, (x, w, torch.randn(4), ws, a_s, 4, 8, True, backend))
    torch.library.opcheck(quant_linear_backward_op,
                          (torch.randn(4, 5).t(), x, w, ws, a_s, 4, 8, True, 1.0, 1.0, None, 0, backend))
    a, b = torch.randn(2, 7, 5).transpose(1, 2), torch.randn(2, 7, 3)  # a [2, 5, 7]
    args = (a, b, a_s, torch.tensor([0.1]), 8, 4, True, True)
    torch.library.opcheck(quant_matmul_forward_op, (*args, backend))
    torch.library.opcheck(quant_matmul_backward_op, (torch.randn(2, 3, 5).transpose(1, 2), *args, 1.0, 1.0, backend))
