"""Loading of the compiled modules and conversion of tensors for them."""
import torch
from torch.utils.dlpack import to_dlpack

try:
    from fqkernels import _cpu
except ImportError as err:  # not built: the reference backend still works
    _cpu = None
    CPU_IMPORT_ERROR = err
else:
    CPU_IMPORT_ERROR = None

try:
    from fqkernels import _cuda
except ImportError as err:
    _cuda = None
    CUDA_IMPORT_ERROR = err
else:
    CUDA_IMPORT_ERROR = None


def dl(t):
    """A DLPack capsule viewing ``t`` (no copy); the kernels write outputs through it."""
    return to_dlpack(t.detach())


def stream_of(t):
    """The raw handle of the current CUDA stream of ``t``'s device."""
    return torch.cuda.current_stream(t.device).cuda_stream
