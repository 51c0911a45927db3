"""One optimizer step, shared by the training loop (fqdetr.engine.train) and QAT
(fqdetr.engine.qat): the finite-loss check agreed by every process, backward, an optional
gradient hook, clipping and the update."""
import math
from typing import Callable, Mapping, Optional

import torch

from fqdetr.engine import distributed as dist_utils


def check_finite(loss: torch.Tensor, terms: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Raises FloatingPointError when the scalar ``loss`` is not finite on this process or,
    in a distributed run, on any other: every rank stops together, so none is left waiting in
    backward's all-reduce. ``terms``: the loss dict, shown in the message."""
    bad = not math.isfinite(loss.item())
    if dist_utils.world_size() > 1:
        bad = dist_utils.all_reduce_sum(torch.tensor([float(bad)], device=loss.device)).item() > 0
    if bad:
        shown = {k: v.item() for k, v in terms.items()} if terms else {}
        raise FloatingPointError(f"loss is {loss.item()} (on rank {dist_utils.rank()}; non-finite on at least "
                                 f"one rank) {shown}")


def optimizer_step(loss: torch.Tensor, optimizer, clip_max_norm: float,
                   after_backward: Optional[Callable[[], None]] = None) -> float:
    """zero_grad, ``loss.backward()``, ``after_backward()`` (e.g. averaging gradients over
    processes by hand), clipping of the optimizer's parameters to ``clip_max_norm`` (0 or None:
    no clipping), optimizer.step(). Returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = clip_max_norm if clip_max_norm and clip_max_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    return float(grad_norm)
