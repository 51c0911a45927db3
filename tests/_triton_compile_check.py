"""Compiles, without a GPU, every Triton kernel variant that our launchers would launch,
for sm_90 and sm_80 (triton ships its own ptxas). The launchers run on CPU tensors with
the kernel launch replaced by an ahead-of-time compile of the same signature and
constexprs, so what is compiled is what the code would run. The interpreter, which the
other tests use, never compiles: a kernel can pass there and still fail to compile.

Run with TRITON_INTERPRET unset (tests/test_triton_compile.py does). Prints one line
per variant: kernel, constexprs, shared memory per target, and whether the PTX holds
tensor-core instructions (mma / wgmma).
"""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run with TRITON_INTERPRET unset: the interpreter does not compile")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

TARGETS = (GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32))
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
compiled = set()


def compile_instead_of_launch(kernel, grid):
    def launch(*args, **kwargs):
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        bound = dict(zip(kernel.arg_names, args)) | kwargs
        signature, constexprs = {}, {}
        for p in kernel.params:
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", bound[p.name]
            else:
                signature[p.name] = mangle_type(bound[p.name])
        key = (kernel.fn.__name__, tuple(signature.items()), tuple(constexprs.items()))
        if key in compiled:
            return
        compiled.add(key)
        report = []
        for target in TARGETS:
            k = triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=options)
            ptx = k.asm["ptx"]
            report.append(f"sm_{target.arch}: shared {k.metadata.shared} B, tensor cores "
                          f"{'yes' if 'mma' in ptx else 'no'}")
        flags = " ".join(f"{n}={v}" for n, v in constexprs.items())
        dtypes = " ".join(sorted({t for t in signature.values() if t.startswith("*")}))
        print(f"{kernel.fn.__name__} [{dtypes}] {flags} | {'; '.join(report)}", flush=True)
    return launch


def drive_quant_gemm():
    from fqkernels.triton.quant_gemm import QUANT_LINEAR, QUANT_MATMUL

    x, w, b = torch.randn(5, 7, 40), torch.randn(24, 40), torch.randn(24)
    ws, a_s = torch.rand(24) + 0.1, torch.tensor([0.1])
    g = torch.randn(5, 7, 24)
    for a_bits, a_signed in ((8, True), (8, False), (None, True)):  # int path, float path, weight-only
        QUANT_LINEAR.forward(x, w, b, ws, a_s, 4, a_bits, a_signed)
        QUANT_LINEAR.backward(g, x, w, ws, a_s, 4, a_bits, a_signed)
    QUANT_LINEAR.forward(x.bfloat16(), w.bfloat16(), b, ws, a_s, 4, 8)
    qa, ka = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 16, 11)
    for signed in (True, False):  # Q K^T on the int path; softmax (unsigned 8 bit) V on the float path
        QUANT_MATMUL.forward(qa, ka, a_s, a_s, 8, 8, signed, True)
        QUANT_MATMUL.backward(torch.randn(2, 3, 9, 11), qa, ka, a_s, a_s, 8, 8, signed, True)
    QUANT_MATMUL.backward(torch.randn(2, 3, 9, 11), qa, ka[:1], a_s, a_s, 8, 8)  # broadcast batch


def drive_fisher():
    from fqkernels.triton import fisher

    for dtype in (torch.float32, torch.bfloat16):
        x, d = torch.randn(3, 5, 40, dtype=dtype), torch.randn(3, 5, 24, dtype=dtype)
        for t in (5, 1):  # per-token tiles; T = 1 (squared inputs)
            xs, ds = (x, d) if t == 5 else (x[:, 0], d[:, 0])
            for f_dtype in (torch.float32, torch.float64):
                fisher.compute(xs, ds, 0, torch.zeros(24, 40, dtype=f_dtype), torch.empty(24, 40),
                               torch.empty(3, dtype=f_dtype), False)


if __name__ == "__main__":
    JITFunction.__getitem__ = compile_instead_of_launch
    drive_quant_gemm()
    drive_fisher()
    print(f"{len(compiled)} variants compiled for {', '.join(f'sm_{t.arch}' for t in TARGETS)}")
