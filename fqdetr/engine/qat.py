"""Quantization-aware training of a quantized DETR or Deformable DETR (LSQ scales and weights together),
optionally with the Fisher-trace regulariser on the critical objective or with the
critical classes' loss up-weighted (the simpler alternative a user tries first)."""
import copy
import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
from tqdm import tqdm

from fqdetr.engine import distributed as dist_utils
from fqdetr.engine.distributed import all_reduce_sum, world_size
from fqdetr.engine.step import check_finite, optimizer_step
from fqdetr.models.criterion import weighted_loss
from fqdetr.models.deformable import DeformableSetCriterion
from fqdetr.quant import Quantizer, quantized_weights
from fqdetr.regularize import FisherTraceRegularizer

log = logging.getLogger(__name__)


def upweighted_criterion(criterion, critical_labels, factor):
    """A copy of ``criterion`` whose class weights are ``factor`` for the critical classes: DETR's
    cross-entropy class weights, or the focal loss's per-class weights of a DeformableSetCriterion
    (whose ``empty_weight`` the focal loss never reads)."""
    if factor <= 0:
        raise ValueError(f"factor: expected a positive class weight, got {factor}")
    up = copy.deepcopy(criterion)
    critical = torch.tensor(sorted(critical_labels))
    if isinstance(up, DeformableSetCriterion):
        up.class_weight = torch.ones(up.num_classes)
        up.class_weight[critical] = float(factor)
    else:
        up.empty_weight[critical] = float(factor)
    return up


def _average_gradients(params):
    """Averages gradients over torch.distributed processes (no-op in one process). Done by hand
    rather than with DDP because the Fisher-trace regulariser differentiates with
    torch.autograd.grad, which DDP's reducer does not follow."""
    if world_size() > 1:
        for p in params:
            if p.grad is not None:
                all_reduce_sum(p.grad).div_(world_size())


def _cycle(loader):
    while True:
        yield from loader


def _qat_optimizer(model, lr, scale_lr_factor):
    """(AdamW, trainable parameters, LSQ step sizes) for QAT. Step sizes: no weight decay and a
    ``scale_lr_factor`` smaller learning rate, because Adam's steps have the size of the learning
    rate whatever the parameter's magnitude, and weight step sizes can be ~1e-5."""
    params = [p for p in model.parameters() if p.requires_grad]
    scales = [q.scale for q in model.modules() if isinstance(q, Quantizer) and q.scale.requires_grad]
    scale_ids = {id(p) for p in scales}
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params if id(p) not in scale_ids], "weight_decay": 1e-4},
        {"params": scales, "weight_decay": 0.0, "lr": lr * scale_lr_factor}], lr=lr)
    return optimizer, params, scales


def qat(model, criterion, loader, steps, lr=5e-5, critical_objective=None, reg_lambda=0.0,
        reg_estimator="per-sample", reg_method="exact", clip_max_norm=0.1, scale_lr_factor=0.1, progress=True):
    """Trains the quantized ``model`` in place for ``steps`` batches of ``loader``.

    critical_objective(outputs, targets) -> per-image critical losses [B]; with reg_lambda > 0
    the loss is L_all + reg_lambda * (L_0 / R_0) * R, R = tr(F_crit) (fqdetr.regularize), with
    L_0 and R_0 the first step's values: R's raw size (squared DETR gradients, ~1e2-1e4) would
    make any fixed lambda meaningless across models, so lambda is the regulariser's weight
    relative to the task loss at the start. Returns the per-step log [{"loss", "R"}].
    """
    optimizer, params, scales = _qat_optimizer(model, lr, scale_lr_factor)
    # Each step size is kept above 1e-3 of its starting value, so it can never reach zero.
    floors = [p.detach().abs() * 1e-3 for p in scales]
    average_gradients = functools.partial(_average_gradients, params)
    reg = None
    if reg_lambda > 0:
        if critical_objective is None:
            raise ValueError("critical_objective: needed when reg_lambda > 0")
        weights, quantizers = zip(*quantized_weights(model).values())
        reg = FisherTraceRegularizer(weights, reg_estimator, reg_method, quantizers=quantizers)
    history, reg_scale = [], None
    model.train()
    for m in model.modules():  # frozen BatchNorm statistics: batch statistics would couple the images
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    batches = _cycle(loader)
    for _ in tqdm(range(steps), desc="qat" + (" +R" if reg else ""), disable=not progress, leave=False):
        images, mask, targets = next(batches)
        loss = weighted_loss(criterion(model((images, mask)), targets), criterion.weight_dict)
        record = {"loss": loss.item()}
        if reg is not None:
            def critical_loss(reduction, images=images, mask=mask, targets=targets):
                per_image = critical_objective(model((images, mask)), targets)
                return per_image.sum() if reduction == "batch" else per_image

            def image_loss(n, images=images, mask=mask, targets=targets):
                # Image n alone: the regulariser's per-image backward passes then stay within
                # one image's graph (docs/METHOD.md section 4.2).
                return critical_objective(model((images[n:n + 1], mask[n:n + 1])), targets[n:n + 1])[0]

            penalty = reg(critical_loss, image_loss, len(targets))
            record["R"] = penalty.item()
            if reg_scale is None:  # fixed at the first step: lambda is relative to the task loss
                reg_scale = loss.item() / max(penalty.item(), 1e-12)
            loss = loss + reg_lambda * reg_scale * penalty
        check_finite(loss)
        optimizer_step(loss, optimizer, clip_max_norm, after_backward=average_gradients)
        with torch.no_grad():
            for p, floor in zip(scales, floors):
                torch.maximum(p, floor, out=p)
        history.append(record)
    model.eval()
    return history


@dataclass
class QatJob:
    """What ``fqdetr qat`` runs.

    model: checkpoint path; data: dataset folder (fqdetr.engine.setup.load_datasets); out: the
    run folder. allocation: per-layer bits (an allocation.json's object; None: uniform
    ``w_bits``), allocation_path: where it was read from (recorded only). steps, lr, reg_*: the
    ``qat`` loop's arguments; upweight != 1: the critical classes' loss weight. image_size,
    batch_size (per process), eval_images, critical: as fqdetr.engine.setup.prepare_run.
    """

    model: str
    data: str
    out: str
    allocation: Optional[Mapping[str, Any]] = None
    allocation_path: Optional[str] = None
    w_bits: int = 4
    steps: int = 200
    lr: float = 5e-5
    reg_lambda: float = 0.0
    reg_estimator: str = "per-sample"
    reg_method: str = "exact"
    upweight: float = 1.0
    seed: int = 0
    image_size: Optional[int] = None
    batch_size: int = 8
    eval_images: int = 200
    critical: str = "person"


def run_qat_job(job: QatJob) -> Optional[Dict[str, Any]]:
    """Quantizes ``job.model`` (calibrated on the first training images), trains it with ``qat``
    and, on rank 0, writes OUT/qat_state.pt (the model state) and OUT/qat.json {"history",
    "eval" (val and train-subset evaluation), "processes", "args" (the job, the allocation as its
    path)}, and returns that dict (None on the other ranks). Under torchrun each process trains
    on its shard of the data, gradients averaged every step; the process group is created and
    destroyed here unless it already exists."""
    from fqdetr.engine.checkpoint import seed_everything
    from fqdetr.engine.loader import make_loader
    from fqdetr.engine.quantize import quantize_detr
    from fqdetr.engine.setup import evaluate_splits, prepare_run
    from fqdetr.io import atomic_torch_save, write_json

    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dist_utils.init_distributed()
    try:
        seed_everything(job.seed)
        model, data, loaders, criterion, objectives, S, sets, canvas = prepare_run(
            job.model, job.data, job.out, image_size=job.image_size, batch_size=job.batch_size,
            eval_images=job.eval_images, critical=job.critical)
        qmodel = quantize_detr(model, allocation=job.allocation, w_bits=job.w_bits, calib_loader=loaders["train"])
        if job.upweight != 1.0:
            criterion = upweighted_criterion(criterion, S, job.upweight)
        train_loader = make_loader(data["train"], job.batch_size, canvas, shuffle=True, seed=job.seed, shard=True)
        history = qat(qmodel, criterion, train_loader, job.steps, lr=job.lr, critical_objective=objectives["critical"],
                      reg_lambda=job.reg_lambda, reg_estimator=job.reg_estimator, reg_method=job.reg_method,
                      progress=dist_utils.is_main())
        if not dist_utils.is_main():
            return None
        atomic_torch_save(qmodel.state_dict(), f"{job.out}/qat_state.pt")
        recorded = dict(dataclasses.asdict(job), allocation=job.allocation_path)
        result = {"history": history, "eval": evaluate_splits(qmodel, loaders, sets),
                  "processes": world_size(), "args": recorded}
        write_json(result, f"{job.out}/qat.json")
        return result
    finally:
        if owns_group:
            dist_utils.cleanup()
