"""DETR training loop: AdamW with DETR's parameter groups, StepLR, gradient clipping,
progress bars, JSON-lines logs, atomic checkpoints and exact resume.

Files under ``out_dir``:
- ``checkpoint.pth``: latest full training state (resume from it);
- ``best.pth``: model-only checkpoint (``load_detr_checkpoint``) of the best val mAP;
- ``log.jsonl``: one JSON object per logged step and per epoch.

Under ``torchrun`` (a process group initialised by fqdetr.engine.distributed.init_distributed)
the same call trains with DistributedDataParallel: every rank builds the same model and
criterion and passes a loader whose sampler shards the training set
(``make_loader(..., shard=True)``); ``train_detr`` wraps the model, averages the logged
losses over the ranks, and leaves logging, progress bars, checkpoints and evaluation to
rank 0 (the others wait at a barrier). Checkpoints hold the unwrapped model, every rank's
RNG state and the world size; ``resume`` loads the same file on every rank.
"""
import json
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from fqdetr.engine import distributed as dist_utils
from fqdetr.engine.checkpoint import (capture_rng_state, load_training_checkpoint, restore_rng_state,
                                      save_training_checkpoint, seed_everything)
from fqdetr.engine.evaluate import evaluate_model
from fqdetr.engine.step import check_finite, optimizer_step
from fqdetr.models import save_detr_checkpoint, weighted_loss

log = logging.getLogger(__name__)


# Deformable DETR's sampling-offset and reference-point projections train at lr x 0.1
# (the official lr_linear_proj_mult): large steps there move the sampling locations far away.
LINEAR_PROJ_NAMES, LINEAR_PROJ_LR_MULT = ("reference_points", "sampling_offsets"), 0.1


def param_groups(model: nn.Module, lr: float, lr_backbone: float) -> list:
    """DETR's two groups: trainable parameters outside the backbone at ``lr``, those
    whose name contains "backbone" at ``lr_backbone``; Deformable DETR adds a third, its
    LINEAR_PROJ_NAMES outside the backbone at ``lr * LINEAR_PROJ_LR_MULT``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in named if "backbone" in n]
    linear_proj = [p for n, p in named if "backbone" not in n and any(k in n for k in LINEAR_PROJ_NAMES)]
    chosen = {id(p) for p in backbone + linear_proj}
    groups = [{"params": [p for _, p in named if id(p) not in chosen], "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": lr_backbone})
    if linear_proj:
        groups.append({"params": linear_proj, "lr": lr * LINEAR_PROJ_LR_MULT})
    return groups


def build_optimizer(model: nn.Module, lr: float = 1e-4, lr_backbone: float = 1e-5,
                    weight_decay: float = 1e-4) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, lr, lr_backbone), lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer, lr_drop: int, gamma: float = 0.1):
    """StepLR: every lr multiplied by ``gamma`` after each ``lr_drop`` epochs."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, int(lr_drop)), gamma=gamma)


def _to_device(images, mask, targets, device):
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images.to(device), mask.to(device), targets


def train_step(model, criterion, batch, optimizer, clip_max_norm: float, device) -> Dict[str, float]:
    """One optimizer step on ``batch`` = (images, mask, targets). Returns the weighted
    loss ("loss"), each loss term and the gradient norm before clipping."""
    images, mask, targets = _to_device(*batch, device)
    loss_dict = criterion(model((images, mask)), targets)
    loss = weighted_loss(loss_dict, criterion.weight_dict)
    check_finite(loss, loss_dict)
    out = {"loss": loss.item(), "grad_norm": optimizer_step(loss, optimizer, clip_max_norm)}
    # final-layer terms only; the auxiliary ones end in "_<layer>"
    out.update({k: v.item() for k, v in loss_dict.items() if not k.rsplit("_", 1)[-1].isdigit()})
    return out


class _Logger:
    """Appends JSON lines to out_dir/log.jsonl."""

    def __init__(self, out_dir: Optional[str]):
        self.path = os.path.join(out_dir, "log.jsonl") if out_dir else None

    def __call__(self, record: Mapping[str, Any]) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _replace_lr_period(scheduler, lr_drop: int) -> None:
    """Give a resumed StepLR a new period, with every lr set to where the new schedule is now.

    StepLR updates lr multiplicatively, so changing only step_size would keep an lr already
    dropped under the old period (e.g. extending a finished run would never raise it again).
    """
    scheduler.step_size = max(1, int(lr_drop))
    drops = max(0, scheduler.last_epoch) // scheduler.step_size
    for group in scheduler.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * scheduler.gamma ** drops
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _mean(records: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    keys = records[0].keys() if records else ()
    return {k: sum(r[k] for r in records) / len(records) for k in keys}


@dataclass
class TrainConfig:
    """How ``train_detr`` trains (DETR's recipe) and where it writes.

    lr / lr_backbone / weight_decay: AdamW (backbone group at lr_backbone); lr_drop: StepLR
    period in epochs (default: 2/3 of ``epochs``, or the resumed checkpoint's); clip_max_norm:
    gradient clipping (0 = off). out_dir: checkpoint.pth after every epoch and every
    ``checkpoint_every`` steps, best.pth on the best val mAP, log.jsonl. resume: a
    checkpoint.pth to continue from (model, optimizer, scheduler, RNG, position in the
    epoch). max_steps: stop after this many optimizer steps in total (a checkpoint is written
    there). eval_every: validate every this many epochs and after the last. checkpoint_extra:
    plain data stored in every checkpoint (e.g. the categories, the canvas). critical_sets:
    passed to the evaluation. on_epoch_end: called with each epoch's summary. ddp_kwargs: go to
    DistributedDataParallel (e.g. find_unused_parameters=True).
    """

    epochs: int
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    lr_drop: Optional[int] = None
    clip_max_norm: float = 0.1
    out_dir: Optional[str] = None
    eval_every: int = 1
    resume: Optional[str] = None
    max_steps: Optional[int] = None
    checkpoint_every: Optional[int] = None
    log_every: int = 20
    device: Any = "cpu"
    progress: bool = True
    checkpoint_extra: Optional[Mapping] = None
    critical_sets: Any = None
    on_epoch_end: Optional[Callable[[Dict], None]] = None
    ddp_kwargs: Optional[Mapping] = None


def train_detr(model: nn.Module, criterion: nn.Module, train_loader, val_loader=None, *,
               config: TrainConfig) -> Dict[str, Any]:
    """Train ``model`` as ``config`` says; returns {"step", "epoch", "losses" (per step),
    "epochs" (per-epoch summaries), "best" (best val result or None)}.

    val_loader: evaluated every ``config.eval_every`` epochs and after the last (its dataset
    must be a CocoDetection, possibly a Subset).

    Distributed (torchrun, world size > 1): ``model`` is wrapped in DistributedDataParallel;
    ``train_loader`` should be sharded (make_loader(shard=True)), its batch size is per process.
    "losses" and the logged values are means over the ranks; only rank 0 writes files and
    evaluates (on every rank the returned "best" is rank 0's).
    """
    cfg = config
    model.to(cfg.device)
    criterion.to(cfg.device)
    optimizer = build_optimizer(model, cfg.lr, cfg.lr_backbone, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.lr_drop or max(1, (2 * cfg.epochs) // 3))
    state = {"epoch": 0, "step": 0, "epoch_step": 0, "best": None}
    world, main = dist_utils.world_size(), dist_utils.is_main()
    if cfg.resume:
        _resume(cfg, model, optimizer, scheduler, state, world)
    if world > 1 and getattr(getattr(train_loader, "sampler", None), "world", 1) != world:
        warnings.warn("distributed training with a loader that does not shard the data: every rank "
                      "sees every image (use make_loader(..., shard=True))")
    if cfg.out_dir and main:
        os.makedirs(cfg.out_dir, exist_ok=True)
    # Single process: train_model is model itself. Wrapped after loading the checkpoint (DDP
    # broadcasts rank 0's parameters and buffers when it is built); saved and evaluated unwrapped.
    train_model = dist_utils.wrap_ddp(model, **dict(cfg.ddp_kwargs or {}))
    ctx = _Context(cfg, model, criterion, optimizer, scheduler, train_loader, val_loader,
                   _Logger(cfg.out_dir if main else None), train_model, world, main)
    history = {"losses": [], "epochs": []}
    while state["epoch"] < cfg.epochs and not ctx.done(state):
        summary = _run_epoch(ctx, state, history)
        if summary is None:  # stopped by max_steps inside the epoch
            break
        last = state["epoch"] == cfg.epochs
        if val_loader is not None and (last or state["epoch"] % max(1, cfg.eval_every) == 0):
            if main:
                _validate(ctx, state, summary)
            if world > 1:  # the others wait for rank 0's evaluation, then share its best
                state["best"] = dist_utils.broadcast_object(state["best"])
        history["epochs"].append(summary)
        ctx.logger(summary)
        ctx.save(state)
        if cfg.on_epoch_end:
            cfg.on_epoch_end(summary)
    return {"step": state["step"], "epoch": state["epoch"], "best": state["best"], **history}


def _resume(cfg: TrainConfig, model, optimizer, scheduler, state: Dict, world: int) -> None:
    """Load cfg.resume into the model, optimizer, scheduler, RNG and ``state``."""
    ckpt = load_training_checkpoint(cfg.resume, model, optimizer, scheduler)
    if cfg.lr_drop:  # an explicit period replaces the checkpoint's
        _replace_lr_period(scheduler, cfg.lr_drop)
    state.update(epoch=ckpt["epoch"], step=ckpt["step"], epoch_step=ckpt["epoch_step"], best=ckpt.get("best"))
    _restore_rank_rng(ckpt, cfg.resume, world)
    log.info("resumed from %s at epoch %d, step %d (%d into the epoch)", cfg.resume,
             state["epoch"], state["step"], state["epoch_step"])


@dataclass
class _Context:
    """What the epoch loop needs besides the progress state."""

    config: TrainConfig
    model: nn.Module
    criterion: nn.Module
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    logger: Callable[[Mapping], None]
    train_model: nn.Module  # the model, or its DistributedDataParallel wrapper
    world: int = 1
    main: bool = True  # rank 0: writes files and evaluates

    def done(self, state) -> bool:
        return self.config.max_steps is not None and state["step"] >= self.config.max_steps

    def save(self, state) -> None:
        """checkpoint.pth from rank 0; every rank calls it (their RNG states are gathered)."""
        if not self.config.out_dir:
            return
        rank_rng = None
        if self.world > 1:
            rank_rng = [None] * self.world
            torch.distributed.all_gather_object(rank_rng, capture_rng_state())
        if not self.main:
            return
        extra = dict(self.config.checkpoint_extra or {}, best=state["best"])
        if rank_rng is not None:
            extra.update(world_size=self.world, rng_ranks=rank_rng)
        save_training_checkpoint(os.path.join(self.config.out_dir, "checkpoint.pth"), self.model,
                                 self.optimizer, self.scheduler, epoch=state["epoch"],
                                 step=state["step"], epoch_step=state["epoch_step"], extra=extra)


def _restore_rank_rng(ckpt: Mapping, path, world: int) -> None:
    """After load_training_checkpoint restored rank 0's RNG state: each rank continues its own
    stream when the checkpoint has one per rank of this world size."""
    saved_world = int(ckpt.get("world_size", 1))
    if saved_world != world:
        if ckpt.get("epoch_step"):
            warnings.warn(f"{path} was written by {saved_world} process(es), resumed with {world}: the "
                          f"rest of epoch {ckpt['epoch']} is resharded, so some of its images are "
                          f"seen twice or not at all")
        if world > 1 and dist_utils.rank() > 0:
            # no saved stream for this rank: derive a distinct one (not bitwise resumable)
            seed_everything(int(ckpt["step"]) * 1000003 + dist_utils.rank())
        return
    if world > 1 and "rng_ranks" in ckpt:
        restore_rng_state(ckpt["rng_ranks"][dist_utils.rank()])


def _set_epoch(loader, epoch: int, start_batch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        try:
            sampler.set_epoch(epoch, start_batch * loader.batch_size)
        except TypeError:  # e.g. DistributedSampler.set_epoch(epoch)
            if start_batch:
                raise ValueError("mid-epoch resume needs fqdetr.engine.make_loader's sampler")
            sampler.set_epoch(epoch)
    elif start_batch:
        raise ValueError("mid-epoch resume needs a loader made by fqdetr.engine.make_loader")


def _run_epoch(ctx: _Context, state: Dict, history: Dict) -> Optional[Dict]:
    """Train the rest of epoch state["epoch"]; returns its summary, or None when
    max_steps stopped it midway (a checkpoint is then written)."""
    ctx.train_model.train()
    ctx.criterion.train()
    epoch, start = state["epoch"], state["epoch_step"]
    _set_epoch(ctx.train_loader, epoch, start)
    lr = ctx.optimizer.param_groups[0]["lr"]
    records, t0 = [], time.perf_counter()
    # Redrawn every 30 s only when stderr is a log file rather than a terminal.
    bar = tqdm(ctx.train_loader, desc=f"epoch {epoch}", disable=not (ctx.config.progress and ctx.main), leave=False,
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
    for batch in bar:
        rec = train_step(ctx.train_model, ctx.criterion, batch, ctx.optimizer, ctx.config.clip_max_norm,
                         ctx.config.device)
        if ctx.world > 1:
            rec = _mean_over_ranks(rec, ctx.config.device)
        state["step"] += 1
        state["epoch_step"] += 1
        records.append(rec)
        history["losses"].append(rec["loss"])
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.1e}", refresh=False)  # redrawn at the bar's interval
        if ctx.config.log_every and state["step"] % ctx.config.log_every == 0:
            ctx.logger({"type": "step", "epoch": epoch, "step": state["step"], "lr": lr, **rec})
        if ctx.done(state):
            ctx.save(state)
            bar.close()
            return None
        if ctx.config.checkpoint_every and state["step"] % ctx.config.checkpoint_every == 0:
            ctx.save(state)
    bar.close()
    with warnings.catch_warnings():  # a run resumed at the very end of an epoch steps no batch
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        ctx.scheduler.step()
    state["epoch"], state["epoch_step"] = epoch + 1, 0
    summary = {"type": "epoch", "epoch": epoch, "step": state["step"], "lr": lr,
               "time_s": round(time.perf_counter() - t0, 2), **_mean(records)}
    log.info("epoch %d: loss %.4f (ce %.4f, bbox %.4f, giou %.4f) lr %.1e, %.1f s", epoch,
             summary.get("loss", float("nan")), summary.get("loss_ce", float("nan")),
             summary.get("loss_bbox", float("nan")), summary.get("loss_giou", float("nan")),
             lr, summary["time_s"])
    return summary


def _mean_over_ranks(rec: Mapping[str, float], device) -> Dict[str, float]:
    """Per-step values averaged over the processes (the losses of the whole global batch: the
    box terms are normalised by the all-reduced box count; grad_norm is the same everywhere)."""
    keys = list(rec)  # the same keys in the same order on every rank
    t = torch.tensor([float(rec[k]) for k in keys], dtype=torch.float64,
                     device=device if torch.distributed.get_backend() == "nccl" else "cpu")
    dist_utils.all_reduce_sum(t)
    t /= dist_utils.world_size()
    return dict(zip(keys, t.tolist()))


def _validate(ctx: _Context, state: Dict, summary: Dict) -> None:
    """Evaluate on the val loader, record AP in ``summary`` and keep best.pth."""
    t0 = time.perf_counter()
    result = evaluate_model(ctx.model, ctx.val_loader, device=ctx.config.device, progress=ctx.config.progress,
                            critical_sets=ctx.config.critical_sets)["result"]
    overall = result["overall"]
    summary.update(val_AP=overall["AP"], val_AP50=overall["AP50"], val_AP75=overall["AP75"],
                   val_time_s=round(time.perf_counter() - t0, 2))
    log.info("epoch %d: val mAP %.4f AP50 %.4f AP75 %.4f", state["epoch"] - 1, overall["AP"],
             overall["AP50"], overall["AP75"])
    best = state["best"]
    if best is None or overall["AP"] > best["AP"]:
        state["best"] = {"epoch": state["epoch"] - 1, "step": state["step"], "AP": overall["AP"],
                         "AP50": overall["AP50"], "AP75": overall["AP75"]}
        if ctx.config.out_dir:
            save_detr_checkpoint(ctx.model, os.path.join(ctx.config.out_dir, "best.pth"),
                                 extra=dict(ctx.config.checkpoint_extra or {}, val=state["best"]))
    ctx.model.train()
