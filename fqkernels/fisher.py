"""per_sample_fisher / per_sample_sq_norms: the squared per-sample weight gradients of
a linear map, summed over samples (diag of the empirical Fisher times N) or reduced
to one squared norm per sample, without materialising per-sample gradients in the
compiled backends."""
import torch

from fqkernels import backends, checks, reference


class _Reference:
    fisher = staticmethod(reference.per_sample_fisher)
    sq_norms = staticmethod(reference.per_sample_sq_norms)


backends.register("per_sample_fisher", "reference", _Reference())


def _check(x, grad_out, batch_dim, dtype):
    checks.check_tensor(x, "x", dim=(2, 3))
    checks.check_tensor(grad_out, "grad_out", dim=(2, 3))
    checks.check_same_device(x, "x", grad_out, "grad_out")
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"grad_out: expected leading dims {list(x.shape[:-1])} of x, got shape "
                         f"{list(grad_out.shape)}")
    if batch_dim not in (0, 1) or (x.dim() == 2 and batch_dim != 0):
        raise ValueError(f"batch_dim: expected 0 (or 1 for a 3-D [T, N, K] input), got {batch_dim}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype: expected torch.float32 or torch.float64 accumulation, got {dtype}")


def per_sample_fisher(x, grad_out, batch_dim=0, dtype=torch.float32, backend=None):
    """sum_n (D_n^T X_n)^2 -> [M, K] in ``dtype``.

    x: [N, T, K] (batch_dim=0), [T, N, K] (batch_dim=1) or [N, K] (one token per sample);
    grad_out: the gradient of the per-sample-summed loss w.r.t. the layer output, same
    layout with M features.
    """
    _check(x, grad_out, batch_dim, dtype)
    name = backends.backend_for("per_sample_fisher", x, backend)
    return backends.impl("per_sample_fisher", name).fisher(x, grad_out, batch_dim=batch_dim, dtype=dtype)


def per_sample_sq_norms(x, grad_out, batch_dim=0, dtype=torch.float32, backend=None):
    """||D_n^T X_n||_F^2 for each sample -> [N] in ``dtype`` (layouts as per_sample_fisher)."""
    _check(x, grad_out, batch_dim, dtype)
    name = backends.backend_for("per_sample_fisher", x, backend)
    return backends.impl("per_sample_fisher", name).sq_norms(x, grad_out, batch_dim=batch_dim, dtype=dtype)
