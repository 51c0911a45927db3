"""``fqdetr train``: train a DETR on a COCO-format dataset (e.g. the built-in one).

    fqdetr data make --out data/builtin
    fqdetr train --data data/builtin --preset tiny --epochs 50 --out runs/tiny

Writes OUT/checkpoint.pth (full training state, for --resume), OUT/best.pth (model
only, best val mAP; loads with fqdetr.models.load_detr_checkpoint), OUT/log.jsonl,
OUT/config.json and OUT/eval/report.{json,md} for the best model on the val split.

Several processes (DistributedDataParallel; gloo on CPU, nccl with --device cuda):

    torchrun --nproc_per_node 2 -m fqdetr train --data data/builtin --epochs 50 --out runs/tiny

--batch-size is then per process; rank 0 logs, evaluates and writes OUT; --resume loads the
same checkpoint on every rank.
"""
import json
import logging
import os
import random
import shutil
import sys
import time

log = logging.getLogger(__name__)

ARCH_FLAGS = {  # flag -> (type, detr_from_config keyword, help)
    "--hidden-dim": (int, "hidden_dim", "transformer width"),
    "--nheads": (int, "nheads", "attention heads"),
    "--enc-layers": (int, "enc_layers", "encoder layers"),
    "--dec-layers": (int, "dec_layers", "decoder layers"),
    "--dim-feedforward": (int, "dim_feedforward", "transformer FFN width"),
    "--num-queries": (int, "num_queries", "object queries (>= max objects per image)"),
    "--dropout": (float, "dropout", "transformer dropout"),
    "--backbone-width": (int, "backbone_width", "ResNet stem width (64 = standard)"),
}


def add_parser(subparsers):
    p = subparsers.add_parser(
        "train", help="train a DETR (AdamW, StepLR, clipping, checkpoints, resume)",
        description="Train a DETR with DETR's recipe (AdamW, backbone lr group, StepLR, gradient "
                    "clipping, auxiliary decoder losses) on a COCO-format dataset.",
        epilog="Data layout: DIR/{train,val}/ + DIR/annotations/instances_{train,val}.json (what "
               "'fqdetr data make --out DIR' writes), or COCO's train2017/val2017. Outputs in OUT: "
               "checkpoint.pth (resume), best.pth (best val mAP, model only), log.jsonl, "
               "eval/report.md. Example: fqdetr train --data data/builtin --preset tiny "
               "--epochs 50 --out runs/tiny")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="DIR", help="dataset root (see below)")
    g.add_argument("--image-size", type=int, default=128, metavar="PX",
                   help="shorter image side at validation; training resizes at random to "
                        "0.75x-1x of it (default 128; longer side capped at 4/3 of it)")
    g.add_argument("--canvas", type=int, default=None, metavar="PX",
                   help="side of the square every image is padded to, in training and in any later use "
                        "of the model (stored in its checkpoints; default: the resumed checkpoint's, else "
                        "the longest resized side, 4/3 of --image-size)")
    g.add_argument("--batch-size", type=int, default=16,
                   help="images per step in each process (default 16; under torchrun the "
                        "global batch is this times the number of processes)")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    g.add_argument("--train-limit", type=int, default=None, metavar="N",
                   help="use only the first N training images")
    g.add_argument("--val-limit", type=int, default=None, metavar="N",
                   help="validate during training on the first N val images only (the final "
                        "report uses all of them)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="tiny", help="model preset of fqdetr.models.PRESETS (default tiny)")
    g.add_argument("--norm", choices=["frozen", "batch"], default=None,
                   help="backbone normalisation (default: the preset's; 'batch' for training from scratch)")
    g.add_argument("--dilation", action="store_true", help="dilate the last ResNet stage (stride 16, DC5)")
    for flag, (typ, _, text) in ARCH_FLAGS.items():
        g.add_argument(flag, type=typ, default=None, help=f"{text} (default: the preset's)")
    g.add_argument("--no-aux-loss", action="store_true", help="no auxiliary decoder losses")
    g.add_argument("--eos-coef", type=float, default=0.1, help="no-object class weight (default 0.1)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, required=True, help="training epochs")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    g.add_argument("--lr-backbone", type=float, default=None,
                   help="backbone learning rate (default: --lr, since the backbone is trained from "
                        "scratch; DETR uses 1e-5 for a pretrained one)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    g.add_argument("--lr-drop", type=int, default=None, metavar="EPOCHS",
                   help="divide the lr by 10 every EPOCHS epochs (default: 2/3 of --epochs)")
    g.add_argument("--clip-max-norm", type=float, default=0.1, help="gradient clipping norm, 0 = off (default 0.1)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="DIR", help="output directory")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue from a checkpoint.pth (architecture and state come from it)")
    g.add_argument("--eval-every", type=int, default=5, metavar="EPOCHS",
                   help="validate every EPOCHS epochs and after the last (default 5)")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="also write checkpoint.pth every STEPS steps (always after each epoch)")
    g.add_argument("--export", default=None, metavar="PATH", help="copy best.pth here at the end")
    g.add_argument("--seed", type=int, default=42, help="seed of init, data order and augmentation (default 42)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--device", default="cpu",
                   help="torch device (default cpu); under torchrun 'cpu' (gloo) or 'cuda' (nccl, "
                        "cuda:LOCAL_RANK in each process)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _split_paths(root, split):
    """(image folder, annotation json) for the built-in layout or COCO 2017's."""
    from fqdetr.data import builtin_paths

    for name in (split, f"{split}2017"):
        folder = os.path.join(root, name)
        ann = os.path.join(root, "annotations", f"instances_{name}.json")
        if os.path.isfile(ann):
            return folder, ann
    folder, ann = builtin_paths(root, split)
    raise FileNotFoundError(f"no {split} annotations under {root} (expected {ann}); "
                            f"generate the built-in dataset with: fqdetr data make --out {root}")


def _scales(size):
    """Training shorter sides: 0.75x .. 1x of ``size`` in steps of 1/8, multiples of 8."""
    return sorted({max(32, int(round(size * k / 8 / 8)) * 8) for k in (6, 7, 8)})


def build_datasets(args):
    import torch
    from fqdetr.data import CocoDetection, make_transforms

    max_size = int(round(args.image_size * 4 / 3))
    train = CocoDetection(*_split_paths(args.data, "train"),
                          transforms=make_transforms("train", scales=_scales(args.image_size), max_size=max_size))
    val = CocoDetection(*_split_paths(args.data, "val"),
                        transforms=make_transforms("val", scales=(args.image_size,), max_size=max_size))
    if args.train_limit:
        train = torch.utils.data.Subset(train, range(min(args.train_limit, len(train))))
    return train, val


def build_model(args, num_classes):
    from fqdetr.models import build_detr, load_detr_checkpoint

    if args.resume:
        return load_detr_checkpoint(args.resume)
    overrides = {key: getattr(args, flag[2:].replace("-", "_"))
                 for flag, (_, key, _) in ARCH_FLAGS.items()}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.norm:
        overrides["norm"] = args.norm
    if args.dilation:
        overrides["dilation"] = True
    if args.no_aux_loss:
        overrides["aux_loss"] = False
    return build_detr(args.preset, num_classes=num_classes, **overrides)


def _canvas(args):
    """--canvas, else the resumed checkpoint's canvas, else the longest resized side."""
    from fqdetr.data import max_size_for
    from fqdetr.models.checkpoint import read_checkpoint

    if args.canvas:
        return args.canvas
    stored = read_checkpoint(args.resume).get("canvas") if args.resume else None
    return int(stored) if stored else max_size_for(args.image_size)


def _seed_everything(seed):
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(args):
    import torch.distributed
    from fqdetr.engine import distributed as dist_utils

    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = dist_utils.init_distributed(device="cpu" if args.device == "cpu" else None)
    try:
        if info.distributed:
            if args.device != "cpu":
                args.device = str(info.device)  # cuda:LOCAL_RANK
            if not info.is_main:  # one process reports
                logging.getLogger().setLevel(logging.WARNING)
            log.info("distributed training: %d processes (%s), %d images per step", info.world_size,
                     info.backend, info.world_size * args.batch_size)
        return _train(args, info)
    finally:
        if owns_group:
            dist_utils.cleanup()


def _train(args, info):
    import torch
    from fqdetr.engine import distributed as dist_utils
    from fqdetr.engine import evaluate_model, make_loader, train_detr
    from fqdetr.evaluation import write_report
    from fqdetr.models import build_criterion, load_detr_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    _seed_everything(args.seed)
    train_ds, val_ds = build_datasets(args)
    coco_train = getattr(train_ds, "dataset", train_ds)
    model = build_model(args, coco_train.num_classes)  # the same on every rank (DDP broadcasts rank 0's)
    if info.rank > 0:  # distinct dropout / augmentation streams on the other ranks
        _seed_everything(args.seed + info.rank)
    cfg = model.config
    criterion = build_criterion(coco_train.num_classes, dec_layers=cfg["dec_layers"],
                                aux_loss=cfg["aux_loss"], eos_coef=args.eos_coef)
    canvas = _canvas(args)
    train_loader = make_loader(train_ds, args.batch_size, canvas, shuffle=True, seed=args.seed,
                               num_workers=args.num_workers, shard=True)
    val_sub = val_ds if not args.val_limit else torch.utils.data.Subset(val_ds, range(min(args.val_limit, len(val_ds))))
    val_loader = make_loader(val_sub, args.batch_size, canvas, shuffle=False, num_workers=args.num_workers)
    extra = {"categories": coco_train.coco.dataset["categories"],
             "label_to_cat_id": list(coco_train.label_to_cat_id), "num_classes": coco_train.num_classes,
             "image_size": args.image_size, "canvas": canvas,
             "train_command": " ".join(["fqdetr"] + sys.argv[1:]) if sys.argv else ""}
    if info.is_main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({"args": vars(args) | {"func": None}, "model": cfg, "world_size": info.world_size},
                      f, indent=2, default=str)
    log.info("training %s (%.2fM parameters) on %d images, %d classes, %d steps/epoch", args.preset,
             sum(p.numel() for p in model.parameters()) / 1e6, len(train_ds), coco_train.num_classes,
             len(train_loader))
    start = time.perf_counter()
    history = train_detr(
        model, criterion, train_loader, val_loader, epochs=args.epochs, lr=args.lr,
        lr_backbone=args.lr if args.lr_backbone is None else args.lr_backbone,
        weight_decay=args.weight_decay, lr_drop=args.lr_drop, clip_max_norm=args.clip_max_norm,
        out_dir=args.out, eval_every=args.eval_every, resume=args.resume, max_steps=args.max_steps,
        checkpoint_every=args.checkpoint_every, device=args.device, progress=not args.no_progress,
        checkpoint_extra=extra)
    log.info("training done in %.1f min: %d steps, best %s", (time.perf_counter() - start) / 60,
             history["step"], history["best"])
    if not info.is_main:  # rank 0 evaluates and exports
        dist_utils.barrier()
        return 0
    best = os.path.join(args.out, "best.pth")
    if os.path.isfile(best):
        model = load_detr_checkpoint(best).to(args.device)
        full = make_loader(val_ds, args.batch_size, canvas, shuffle=False, num_workers=args.num_workers)
        result = evaluate_model(model, full, device=args.device, progress=not args.no_progress)["result"]
        paths = write_report(result, os.path.join(args.out, "eval"), title=f"{args.preset} DETR, val split")
        log.info("best model on the full val split: mAP %.4f AP50 %.4f -> %s", result["overall"]["AP"],
                 result["overall"]["AP50"], paths["markdown"])
    if args.export and os.path.isfile(best):
        os.makedirs(os.path.dirname(os.path.abspath(args.export)), exist_ok=True)
        shutil.copyfile(best, args.export)
        log.info("exported %s -> %s", best, args.export)
    dist_utils.barrier()
    return 0
