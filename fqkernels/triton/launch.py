"""Launch helpers shared by the Triton kernels of fqkernels."""
import contextlib

import torch

MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions y and z (x allows 2^31 - 1)


def on_device_of(t):
    """Context in which a launch runs on ``t``'s GPU (triton launches on the current
    device); nothing to select for CPU tensors under TRITON_INTERPRET=1."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
