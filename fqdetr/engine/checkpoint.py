"""Training-state checkpoints: model, optimizer, scheduler, progress and RNG states.

A training checkpoint is a superset of the model checkpoint format of
``fqdetr.models.save_detr_checkpoint`` (``{"model": state_dict, "args": config}``),
so ``load_detr_checkpoint`` reads it too. Everything in it is a tensor, a number, a
string or a container of those, so it loads with ``torch.load(weights_only=True)``;
RNG states are stored as tensors for that reason.

Files are written atomically: to a temporary file in the same directory, flushed and
fsynced, then renamed over the destination with ``os.replace``. A crash or an
exception during the write leaves the previous file untouched.
"""
import random
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from torch import nn

from fqdetr.io import atomic_torch_save
from fqdetr.models.checkpoint import read_checkpoint


def seed_everything(seed: int) -> None:
    """Seeds Python's ``random``, numpy's global generator and torch (CPU and CUDA): every
    stream that capture_rng_state saves."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def capture_rng_state() -> Dict[str, torch.Tensor]:
    """Python, numpy, torch CPU (and CUDA when present) RNG states, all as tensors."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": torch.tensor([version, *py_state], dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_meta": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if kind != "MT19937":
        raise RuntimeError(f"unexpected numpy bit generator {kind}")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Inverse of capture_rng_state (CUDA states only where CUDA is available)."""
    py = state["python"].tolist()
    gauss = state["python_gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), gauss[0] if gauss else None))
    pos, has_gauss = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"].to(torch.uint8))
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_training_checkpoint(path, model: nn.Module, optimizer=None, scheduler=None, *,
                             epoch: int, step: int, epoch_step: int = 0,
                             extra: Optional[Mapping] = None) -> None:
    """Write the full training state atomically.

    ``epoch``: the epoch training resumes in; ``epoch_step``: batches of that epoch
    already done (0 at an epoch boundary); ``step``: optimizer steps so far.
    ``extra`` (plain data: categories, metrics...) is stored under its own keys.
    """
    payload = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "args": dict(getattr(model, "config", {})),
        "epoch": int(epoch), "step": int(step), "epoch_step": int(epoch_step),
        "rng": capture_rng_state(),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        payload["lr_scheduler"] = scheduler.state_dict()
    for key, value in (extra or {}).items():
        if key in payload:
            raise ValueError(f"extra key {key!r} clashes with the checkpoint's own keys")
        payload[key] = value
    atomic_torch_save(payload, path)


def load_training_checkpoint(path, model: nn.Module, optimizer=None, scheduler=None,
                             restore_rng: bool = True) -> Dict[str, Any]:
    """Load a save_training_checkpoint file into model / optimizer / scheduler.

    Reads with torch.load(weights_only=True). Returns the checkpoint dict (epoch,
    step, epoch_step and any extra keys). Raises ValueError on a file that is not a
    training checkpoint or does not fit the model.
    """
    ckpt = read_checkpoint(path)
    missing = [k for k in ("model", "epoch", "step") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint (lacks {missing}); "
                         f"use load_detr_checkpoint for model-only files")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path} does not fit the model: {err}") from err
    if optimizer is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and "lr_scheduler" in ckpt:
        scheduler.load_state_dict(ckpt["lr_scheduler"])
    if restore_rng and "rng" in ckpt:
        restore_rng_state(ckpt["rng"])
    ckpt.setdefault("epoch_step", 0)
    return ckpt
