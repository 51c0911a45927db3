"""Argument checks shared by the public ops: each failure is a ValueError or
TypeError naming the argument and what was expected."""
import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACCUM_DTYPES = (torch.float32, torch.float64)  # of the Fisher / weight-gradient buffers


def float_dtypes():
    """Input dtypes the ops accept: float64 too inside fk.differentiable() (for checks)."""
    from fqkernels import composite

    return FLOAT_DTYPES + (torch.float64,) if composite.active() else FLOAT_DTYPES


def check_bits(bits, name="bits"):
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name}: expected an int bit-width in 2..8, got {type(bits).__name__}")
    if not 2 <= bits <= 8:
        raise ValueError(f"{name}: expected a bit-width in 2..8, got {bits}")


def check_tensor(t, name, dtypes=None, dim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    dtypes = dtypes or float_dtypes()
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and t.dim() not in (dim if isinstance(dim, tuple) else (dim,)):
        raise ValueError(f"{name}: expected {dim} dimensions, got shape {list(t.shape)}")


def check_same_device(ref, ref_name, t, name):
    if t is not None and t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref_name}'s device {ref.device}, got {t.device}")


def check_scale_values(scale, name):
    """Every element of ``scale`` finite and positive. Eagerly a ValueError (reading the
    values synchronises a GPU once per call). Under torch.compile / torch.export a Python
    branch on tensor values cannot be traced (a data-dependent guard): the check becomes
    an assert node of the graph, which raises when the compiled code runs."""
    if not scale.numel():
        return
    if torch.compiler.is_compiling():
        ok = torch.isfinite(scale).all() & (scale > 0).all()
        torch._assert_async(ok, f"{name}: expected finite positive values (NaN/Inf or <= 0 present)")
        return
    # One reduction (min and max both propagate NaN) and one read, not five ops: this runs
    # on every call of every quantized layer.
    low, high = torch.stack(torch.aminmax(scale.detach())).tolist()
    if not (low > 0 and high < math.inf):
        raise ValueError(f"{name}: expected finite positive values, got min {scale.min().item():g} "
                         f"(NaN/Inf or <= 0 present)")


def check_output(t, name, shape, x):
    """An output buffer the kernels write: ACCUM_DTYPES, on x's device, ``shape``, contiguous."""
    check_tensor(t, name, dtypes=ACCUM_DTYPES)
    check_same_device(x, "x", t, name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor")


def as_scale(scale, name, like, numel):
    """Turns a float or tensor scale into a float32 tensor of ``numel`` elements,
    checking that every element is finite and positive (``check_scale_values``)."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"{name}: expected a finite positive scale, got {scale}")
        return torch.full((numel,), float(scale), dtype=torch.float32, device=like.device)
    check_tensor(scale, name, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
    check_same_device(like, "the input", scale, name)
    if scale.numel() != numel:
        raise ValueError(f"{name}: expected {numel} element(s), got shape {list(scale.shape)}")
    check_scale_values(scale, name)
    return scale if scale.dtype == torch.float32 else scale.float()


def normalize_axis(axis, x, name="axis"):
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{name}: expected None or an int dimension, got {type(axis).__name__}")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"{name}: expected a dimension of the input (ndim {x.dim()}), got {axis}")
    return axis % x.dim()
