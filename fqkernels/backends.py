"""Backend registry: which implementation of an op runs for given tensors.

Backends, in order of preference on each device:
    CUDA tensors: cuda > triton > reference
    CPU tensors:  cpu > reference          (triton only when forced: it then runs
                                            under TRITON_INTERPRET=1, for tests)
``FQ_BACKEND=name`` (or an explicit ``backend=`` argument) forces one; asking for a
backend that is not available, or that does not implement the op, is an error.
"""
import importlib.util
import os

import torch

from fqkernels import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_IMPLS = {}  # (op, backend) -> implementation object


def register(op, backend, impl):
    """Registers ``impl`` (an object with the op's forward/backward functions)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    _IMPLS[(op, backend)] = impl


def _triton_usable():
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _unavailable_reason(backend):
    if backend == "cpu" and _ext._cpu is None:
        return f"the compiled module fqkernels._cpu did not import ({_ext.CPU_IMPORT_ERROR})"
    if backend == "cuda":
        if _ext._cuda is None:
            return f"the compiled module fqkernels._cuda did not import ({_ext.CUDA_IMPORT_ERROR})"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    if backend == "triton" and not _triton_usable():
        return "triton is not installed, or there is no GPU and TRITON_INTERPRET=1 is not set"
    return None


def available_backends():
    """Names of the backends usable in this process."""
    return [b for b in BACKENDS if _unavailable_reason(b) is None]


def _check_forced(op, backend, device_type):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    reason = _unavailable_reason(backend)
    if reason:
        raise RuntimeError(f"backend {backend!r} was requested for {op} but is unavailable: {reason}")
    if (op, backend) not in _IMPLS:
        raise RuntimeError(f"backend {backend!r} does not implement {op}")
    if backend in ("cpu", "cuda") and backend != device_type:
        raise ValueError(f"backend {backend!r} cannot run {op} on {device_type} tensors")


def backend_for(op, x, backend=None):
    """The backend that runs ``op`` on tensor ``x``: ``backend``, else $FQ_BACKEND, else the
    first available in the device's preference order that implements the op."""
    forced = backend or os.environ.get("FQ_BACKEND") or None
    device_type = x.device.type
    if forced:
        _check_forced(op, forced, device_type)
        return forced
    for name in _PREFERENCE.get(device_type, ("reference",)):
        if (op, name) in _IMPLS and _unavailable_reason(name) is None:
            return name
    raise RuntimeError(f"no backend implements {op} for {device_type} tensors")


def impl(op, backend):
    return _IMPLS[(op, backend)]
