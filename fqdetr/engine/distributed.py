"""Small helpers over torch.distributed, for runs launched by ``torchrun``.

    info = init_distributed()          # no-op (world 1) unless launched by torchrun
    loader = make_loader(dataset, batch, canvas, shard=True)   # fqdetr.engine.loader
    ...
    all_reduce_fisher(collector)       # N processes -> the same sums as one process
    if is_main(): save / log / evaluate
    cleanup()

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the process
group uses NCCL when CUDA is available (one GPU per process, ``cuda:LOCAL_RANK``) and
gloo otherwise. Every helper also works in a plain single process (world size 1),
so the loops call them unconditionally. A leaf module: it imports nothing from fqdetr.
"""
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: not distributed

    @property
    def distributed(self):
        return self.backend is not None

    @property
    def is_main(self):
        return self.rank == 0


def _env_int(name, env):
    value = env.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}: expected an integer (as torchrun sets it), "
                         f"got {value!r}") from None


def launched_by_torchrun(env=None):
    """True when the torchrun variables RANK and WORLD_SIZE are set."""
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


def init_distributed(backend=None, device=None, timeout_s=1800):
    """Initialises the default process group from torchrun's environment.

    backend: "gloo" | "nccl" | None (nccl when CUDA is available, else gloo).
    device: "cpu" to force CPU processes on a GPU machine; default cuda:LOCAL_RANK when
        CUDA is available, else cpu.
    Returns a DistInfo; without torchrun's variables (or with WORLD_SIZE=1) nothing is
    initialised and DistInfo() describes the single process. Calling it again after the
    group exists returns the current state.
    """
    env = os.environ
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched_by_torchrun(env):
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, world = _env_int("RANK", env), _env_int("WORLD_SIZE", env)
    local_rank = _env_int("LOCAL_RANK", env) if "LOCAL_RANK" in env else rank
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if world == 1:
        return DistInfo(device=dev)
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not use_cuda:
        raise ValueError("backend 'nccl' needs CUDA devices; use 'gloo' on CPU")
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if use_cuda:
        torch.cuda.set_device(dev)
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    log.info("process group %s: rank %d of %d on %s", backend, rank, world, dev)
    return DistInfo(rank, world, local_rank, dev, backend)


def _active():
    return dist.is_available() and dist.is_initialized()


def current():
    """DistInfo of this process now."""
    if not _active():
        return DistInfo(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    dev = torch.device(f"cuda:{local_rank}" if backend == "nccl" else "cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def rank():
    return dist.get_rank() if _active() else 0


def world_size():
    return dist.get_world_size() if _active() else 1


def is_main():
    """True on rank 0 (and in a single process): the one that logs, evaluates and saves."""
    return rank() == 0


def barrier():
    if _active():
        dist.barrier()


def all_reduce_sum(tensor):
    """In-place sum over processes (no-op in a single process); returns the tensor."""
    if _active() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_fisher(collector):
    """Sums a FisherCollector's accumulators and sample counts over all processes, so each
    holds the sums of every image any process saw (FisherCollector.all_reduce). Returns it."""
    if _active() and world_size() > 1:
        collector.all_reduce()
    return collector


def broadcast_object(obj, src=0):
    """``obj`` from rank ``src`` on every process (plain data: configs, bit allocations)."""
    if not (_active() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup():
    """Destroys the process group (safe to call when none exists)."""
    if _active():
        dist.destroy_process_group()


def shard_indices(indices, rank_, world, pad=True):
    """Rank ``rank_``'s share of ``indices``: indices[rank::world].

    pad=True repeats indices from the start so every rank gets the same count (DDP needs
    equal step counts or the all-reduce of the last step hangs); pad=False gives a
    disjoint cover (every index on exactly one rank), which sums such as the Fisher need.
    """
    indices = list(indices)
    if pad and indices and len(indices) % world:
        extra = world - len(indices) % world
        indices += (indices * (extra // len(indices) + 1))[:extra]
    return indices[rank_::world]


def wrap_ddp(model, info=None, **kwargs):
    """DistributedDataParallel(model) when distributed (device_ids on GPU), else the model.
    ``kwargs`` go to DDP (e.g. find_unused_parameters=True when some parameters get no
    gradient in a step, such as a frozen backbone stage left requiring grad)."""
    info = info or current()
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if info.device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[info.device.index], **kwargs)
    return DistributedDataParallel(model, **kwargs)


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (for saving state dicts)."""
    return getattr(model, "module", model)
