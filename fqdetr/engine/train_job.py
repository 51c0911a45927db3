"""``fqdetr train`` as a function: data, model, loaders, ``train_detr``, then the best model's
report on the whole val split and its export.

Files under the job's ``train.out_dir`` (rank 0 only under torchrun): those of train_detr
(checkpoint.pth, best.pth, log.jsonl), config.json (the job, the model config, the world
size) and eval/report.{json,md}.
"""
import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch

from fqdetr.data import class_names_of, max_size_for
from fqdetr.engine import distributed as dist_utils
from fqdetr.engine.checkpoint import seed_everything
from fqdetr.engine.evaluate import evaluate_model
from fqdetr.engine.family import build_model, criterion_for, family_of
from fqdetr.engine.loader import make_loader
from fqdetr.engine.setup import load_datasets
from fqdetr.engine.train import TrainConfig, train_detr
from fqdetr.io import atomic_write, file_sha256, write_json
from fqdetr.models import load_detr_checkpoint, load_resnet_weights
from fqdetr.models.checkpoint import read_checkpoint

log = logging.getLogger(__name__)

# Images generated when the built-in dataset is asked for and missing (fqdetr data make's sizes).
BUILTIN_TRAIN_IMAGES, BUILTIN_VAL_IMAGES = 2000, 500


@dataclass
class TrainJob:
    """What ``fqdetr train`` runs.

    train: the loop's settings; its ``out_dir`` receives every file, its ``resume`` also gives
        the architecture (``preset`` and ``arch`` are then ignored) and the default canvas.
    image_size: shorter side at evaluation (training: random among train_scales(image_size)).
    canvas: side every image is padded to, stored in the checkpoints (default: the resumed
        checkpoint's, else max_size_for(image_size)).
    batch_size: per process. train_limit / val_limit: first N images (val_limit only for the
        evaluations during training; the final report uses the whole val split).
    preset: a DETR or Deformable DETR preset (fqdetr.engine.family.build_model); arch: keyword
        overrides of the preset. seed: init, data order and augmentation. threads: torch CPU
        threads. export: copy best.pth there at the end. init_backbone: a checkpoint (or ImageNet
        ResNet file) whose backbone weights replace the fresh model's (load_resnet_weights).
    command: the command line, stored in the checkpoints as ``train_command``.
    """

    data: str
    train: TrainConfig
    image_size: int = 128
    canvas: Optional[int] = None
    batch_size: int = 16
    num_workers: int = 0
    train_limit: Optional[int] = None
    val_limit: Optional[int] = None
    preset: str = "tiny"
    arch: Mapping[str, Any] = field(default_factory=dict)
    eos_coef: float = 0.1  # DETR's no-object weight (Deformable DETR's focal loss has none)
    seed: int = 42
    threads: Optional[int] = None
    export: Optional[str] = None
    init_backbone: Optional[str] = None
    command: str = ""

    def __post_init__(self):
        if self.init_backbone and self.train.resume:
            raise ValueError("--init-backbone: not with --resume (the resumed checkpoint restores every weight)")


def run_train_job(job: TrainJob) -> Dict[str, Any]:
    """Runs ``job`` in this process, as one rank of a torchrun launch when there is one (the
    process group is created and destroyed here unless it already exists). Returns
    train_detr's history."""
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = dist_utils.init_distributed(device="cpu" if job.train.device == "cpu" else None)
    try:
        if info.distributed:
            if job.train.device != "cpu":  # cuda:LOCAL_RANK
                job = dataclasses.replace(job, train=dataclasses.replace(job.train, device=str(info.device)))
            if not info.is_main:  # one process reports
                logging.getLogger().setLevel(logging.WARNING)
            log.info("distributed training: %d processes (%s), %d images per step", info.world_size,
                     info.backend, info.world_size * job.batch_size)
        return _train(job, info)
    finally:
        if owns_group:
            dist_utils.cleanup()


def _datasets(job: TrainJob, resumed: Optional[Mapping]):
    """(train dataset, val dataset); a resumed run keeps the checkpoint's label order."""
    data = load_datasets(job.data, job.image_size, BUILTIN_TRAIN_IMAGES, BUILTIN_VAL_IMAGES,
                         class_names=class_names_of(resumed) if resumed else None, augment_train=True)
    train, val = data["train"], data["val"]
    if job.train_limit:
        train = torch.utils.data.Subset(train, range(min(job.train_limit, len(train))))
    return train, val


def _model(job: TrainJob, num_classes: int):
    if job.train.resume:
        return load_detr_checkpoint(job.train.resume)
    model = build_model(job.preset, num_classes=num_classes, **job.arch)
    if job.init_backbone:
        load_resnet_weights(model, job.init_backbone)
        log.info("backbone initialised from %s", job.init_backbone)
    return model


def _backbone_init(job: TrainJob, resumed: Optional[Mapping]) -> Optional[Dict[str, str]]:
    """{"path", "sha256"} of the file the backbone started from: this job's --init-backbone, or the
    resumed checkpoint's record; None for a backbone trained from its random init."""
    if job.init_backbone:
        return {"path": job.init_backbone, "sha256": file_sha256(job.init_backbone)}
    return (resumed or {}).get("init_backbone")


def _train(job: TrainJob, info) -> Dict[str, Any]:
    if job.threads:
        torch.set_num_threads(job.threads)
    seed_everything(job.seed)
    resumed = read_checkpoint(job.train.resume) if job.train.resume else None
    canvas = job.canvas or int((resumed or {}).get("canvas") or max_size_for(job.image_size))
    train_ds, val_ds = _datasets(job, resumed)
    coco = getattr(train_ds, "dataset", train_ds)
    model = _model(job, coco.num_classes)  # the same on every rank (DDP broadcasts rank 0's)
    if info.rank > 0:  # distinct dropout / augmentation streams on the other ranks
        seed_everything(job.seed + info.rank)
    criterion = criterion_for(model, eos_coef=job.eos_coef)
    train_loader = make_loader(train_ds, job.batch_size, canvas, shuffle=True, seed=job.seed,
                               num_workers=job.num_workers, shard=True)
    val_sub = torch.utils.data.Subset(val_ds, range(min(job.val_limit, len(val_ds)))) if job.val_limit else val_ds
    val_loader = make_loader(val_sub, job.batch_size, canvas, shuffle=False, num_workers=job.num_workers)
    extra = {"categories": coco.coco.dataset["categories"], "label_to_cat_id": list(coco.label_to_cat_id),
             "num_classes": coco.num_classes, "image_size": job.image_size, "canvas": canvas,
             "family": family_of(model).name, "train_command": job.command}
    init = _backbone_init(job, resumed)
    if init:  # kept through resumes: best.pth says where its backbone started
        extra["init_backbone"] = init
    config = dataclasses.replace(job.train, checkpoint_extra=dict(job.train.checkpoint_extra or {}, **extra))
    if info.is_main:
        os.makedirs(config.out_dir, exist_ok=True)
        write_json({"job": dataclasses.asdict(job), "model": model.config, "world_size": info.world_size},
                   os.path.join(config.out_dir, "config.json"), other=str)
    log.info("training %s %s (%.2fM parameters) on %d images, %d classes, %d steps/epoch",
             family_of(model).title, job.preset if not job.train.resume else job.train.resume,
             sum(p.numel() for p in model.parameters()) / 1e6, len(train_ds), coco.num_classes, len(train_loader))
    start = time.perf_counter()
    history = train_detr(model, criterion, train_loader, val_loader, config=config)
    log.info("training done in %.1f min: %d steps, best %s", (time.perf_counter() - start) / 60,
             history["step"], history["best"])
    if info.is_main:  # rank 0 evaluates and exports; the others wait
        _report_and_export(job, make_loader(val_ds, job.batch_size, canvas, shuffle=False,
                                            num_workers=job.num_workers))
    dist_utils.barrier()
    return history


def _report_and_export(job: TrainJob, val_loader) -> None:
    """eval/report.{json,md} of best.pth on ``val_loader``, and its copy to job.export."""
    from fqdetr import evaluation  # looked up at call time: tests record the report writes

    cfg = job.train
    best = os.path.join(cfg.out_dir, "best.pth")
    if not os.path.isfile(best):
        return
    model = load_detr_checkpoint(best).to(cfg.device)
    result = evaluate_model(model, val_loader, device=cfg.device, progress=cfg.progress)["result"]
    title = f"{family_of(model).title} ({job.preset if not cfg.resume else 'resumed'}), val split"
    paths = evaluation.write_report(result, os.path.join(cfg.out_dir, "eval"), title=title)
    log.info("best model on the full val split: mAP %.4f AP50 %.4f -> %s", result["overall"]["AP"],
             result["overall"]["AP50"], paths["markdown"])
    if job.export:
        with open(best, "rb") as src:
            atomic_write(job.export, lambda dst: shutil.copyfileobj(src, dst))
        log.info("exported %s -> %s", best, job.export)
