"""``fqdetr train``: train a DETR or a Deformable DETR on a COCO-format dataset (e.g. the
built-in one); the preset chooses the family, its criterion and its evaluation.

    fqdetr data make --out data/builtin
    fqdetr train --data data/builtin --preset tiny --epochs 50 --out runs/tiny
    fqdetr train --data data/builtin --preset deformable_tiny --epochs 50 --out runs/deformable_tiny

Writes OUT/checkpoint.pth (full training state, for --resume), OUT/best.pth (model
only, best val mAP; loads with fqdetr.models.load_detr_checkpoint), OUT/log.jsonl,
OUT/config.json and OUT/eval/report.{json,md} for the best model on the val split.

Several processes (DistributedDataParallel; gloo on CPU, nccl with --device cuda):

    torchrun --nproc_per_node 2 -m fqdetr train --data data/builtin --epochs 50 --out runs/tiny

--batch-size is then per process; rank 0 logs, evaluates and writes OUT; --resume loads the
same checkpoint on every rank.
"""
import argparse
import sys

from fqdetr.cli._common import positive_float, positive_int


def _name_parts(text):
    """argparse type of --trainable-layers: "conv1,layer1" -> ["conv1", "layer1"]."""
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated names like layer2,layer3, got {text!r}")
    return parts


ARCH_FLAGS = {  # flag -> (type, keyword of detr_from_config and deformable_detr_from_config, help)
    "--hidden-dim": (int, "hidden_dim", "transformer width"),
    "--nheads": (int, "nheads", "attention heads"),
    "--enc-layers": (int, "enc_layers", "encoder layers"),
    "--dec-layers": (int, "dec_layers", "decoder layers"),
    "--dim-feedforward": (int, "dim_feedforward", "transformer FFN width"),
    "--num-queries": (int, "num_queries", "object queries (>= max objects per image)"),
    "--dropout": (float, "dropout", "transformer dropout"),
    "--backbone-width": (int, "backbone_width", "ResNet stem width (64 = standard)"),
    "--trainable-layers": (_name_parts, "trainable_layers",
                           "comma-separated parts of backbone parameter names that train, e.g. "
                           "conv1,layer1,layer2,layer3,layer4: the list the shipped models were trained with "
                           "(the stem's bn1 frozen), to reproduce them"),
}
DEFORMABLE_FLAGS = {  # flag -> (type, deformable_detr_from_config keyword, help): Deformable DETR only
    "--num-feature-levels": (int, "num_feature_levels", "feature levels (1: layer4 only, or >= 3)"),
    "--enc-n-points": (int, "enc_n_points", "sampling points per head and level in the encoder"),
    "--dec-n-points": (int, "dec_n_points", "sampling points per head and level in the decoder"),
}


def add_parser(subparsers):
    p = subparsers.add_parser(
        "train", help="train a DETR or Deformable DETR (AdamW, StepLR, clipping, checkpoints, resume)",
        description="Train a DETR or a Deformable DETR with DETR's recipe (AdamW, backbone lr group, "
                    "StepLR, gradient clipping, auxiliary decoder losses; Deformable DETR: focal loss, "
                    "sampling offsets at lr/10) on a COCO-format dataset.",
        epilog="Data layout: DIR/{train,val}/ + DIR/annotations/instances_{train,val}.json (what "
               "'fqdetr data make --out DIR' writes), or COCO's train2017/val2017; 'builtin' generates the built-in "
               "dataset in data/builtin when missing. Outputs in OUT: "
               "checkpoint.pth (resume), best.pth (best val mAP, model only), log.jsonl, "
               "eval/report.md. Example: fqdetr train --data data/builtin --preset tiny "
               "--epochs 50 --out runs/tiny")
    _add_data_options(p.add_argument_group("data"))
    _add_model_options(p.add_argument_group("model"))
    _add_optimisation_options(p.add_argument_group("optimisation"))
    _add_run_options(p.add_argument_group("run"))
    p.set_defaults(func=run)


def _add_data_options(g):
    g.add_argument("--data", required=True, metavar="DIR", help="dataset root (see below)")
    g.add_argument("--image-size", type=positive_int, default=128, metavar="PX",
                   help="shorter image side at validation; training resizes at random to "
                        "0.75x-1x of it (default 128; longer side capped at 4/3 of it)")
    g.add_argument("--canvas", type=positive_int, default=None, metavar="PX",
                   help="side of the square every image is padded to, in training and in any later use "
                        "of the model (stored in its checkpoints; default: the resumed checkpoint's, else "
                        "the longest resized side, 4/3 of --image-size)")
    g.add_argument("--batch-size", type=positive_int, default=16,
                   help="images per step in each process (default 16; under torchrun the "
                        "global batch is this times the number of processes)")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    g.add_argument("--train-limit", type=positive_int, default=None, metavar="N",
                   help="use only the first N training images")
    g.add_argument("--val-limit", type=positive_int, default=None, metavar="N",
                   help="validate during training on the first N val images only (the final "
                        "report uses all of them)")


def _add_model_options(g):
    g.add_argument("--preset", default="tiny",
                   help="model preset: DETR's (fqdetr.models.PRESETS: tiny, r50, ...) or Deformable DETR's "
                        "(fqdetr.models.DEFORMABLE_PRESETS: deformable_tiny, deformable_r50, ...; default tiny)")
    g.add_argument("--norm", choices=["frozen", "batch"], default=None,
                   help="backbone normalisation (default: the preset's; 'batch' for training from scratch)")
    g.add_argument("--dilation", action="store_true", help="dilate the last ResNet stage (stride 16, DC5)")
    for flag, (typ, _, text) in ARCH_FLAGS.items():
        g.add_argument(flag, type=typ, default=None, help=f"{text} (default: the preset's)")
    for flag, (_, _, text) in DEFORMABLE_FLAGS.items():
        g.add_argument(flag, type=positive_int, default=None, help=f"Deformable DETR: {text} (default: the preset's)")
    g.add_argument("--with-box-refine", action="store_true",
                   help="Deformable DETR: iterative bounding-box refinement (each decoder layer refines the "
                        "previous layer's boxes, one head per layer; default: the preset's)")
    g.add_argument("--two-stage", action="store_true",
                   help="Deformable DETR: two-stage (queries from the encoder's top-scoring proposals; "
                        "needs --with-box-refine; default: the preset's)")
    g.add_argument("--level-masks", choices=("nearest", "strided"), default=None,
                   help="Deformable DETR: each feature level's padding mask, 'nearest' (the official resize) or "
                        "'strided' (cells whose own pixels are padding: stays aligned on a --canvas that is not "
                        "a multiple of the strides 16-64; default: the preset's, strided for deformable_tiny)")
    g.add_argument("--no-aux-loss", action="store_true", help="no auxiliary decoder losses")
    g.add_argument("--eos-coef", type=float, default=0.1,
                   help="DETR's no-object class weight (default 0.1; Deformable DETR has no such class)")


def _add_optimisation_options(g):
    g.add_argument("--epochs", type=positive_int, required=True, help="training epochs")
    g.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    g.add_argument("--lr-backbone", type=float, default=None,
                   help="backbone learning rate (default: --lr, since the backbone is trained from "
                        "scratch; DETR uses 1e-5 for a pretrained one)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    g.add_argument("--lr-drop", type=positive_int, default=None, metavar="EPOCHS",
                   help="divide the lr by 10 every EPOCHS epochs (default: 2/3 of --epochs)")
    g.add_argument("--clip-max-norm", type=float, default=0.1, help="gradient clipping norm, 0 = off (default 0.1)")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps in total")


def _add_run_options(g):
    g.add_argument("--out", required=True, metavar="DIR", help="output directory")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue from a checkpoint.pth (architecture and state come from it)")
    g.add_argument("--init-backbone", default=None, metavar="CKPT",
                   help="start the ResNet backbone from this file's weights instead of random ones: a "
                        "DETR or Deformable DETR checkpoint of the same backbone (e.g. "
                        "models/warm_start/deformable_tiny_builtin.pth) or a torchvision ImageNet ResNet file")
    g.add_argument("--eval-every", type=positive_int, default=5, metavar="EPOCHS",
                   help="validate every EPOCHS epochs and after the last (default 5)")
    g.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="STEPS",
                   help="also write checkpoint.pth every STEPS steps (always after each epoch)")
    g.add_argument("--export", default=None, metavar="PATH", help="copy best.pth here at the end")
    g.add_argument("--seed", type=int, default=42, help="seed of init, data order and augmentation (default 42)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--device", default="cpu",
                   help="torch device (default cpu); under torchrun 'cpu' (gloo) or 'cuda' (nccl, "
                        "cuda:LOCAL_RANK in each process)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _arch(args):
    """Preset keyword overrides from the model flags (those left at None keep the preset's)."""
    from fqdetr.engine.family import DEFORMABLE, family_of_preset

    def given(flags):
        return {key: getattr(args, flag[2:].replace("-", "_")) for flag, (_, key, _) in flags.items()
                if getattr(args, flag[2:].replace("-", "_")) is not None}

    arch = given(ARCH_FLAGS)
    deformable = given(DEFORMABLE_FLAGS)
    deformable.update({key: True for key in ("with_box_refine", "two_stage") if getattr(args, key)})
    if args.level_masks:
        deformable["level_masks"] = args.level_masks
    if deformable and not args.resume and family_of_preset(args.preset).name != DEFORMABLE:
        flags = sorted("--" + key.replace("_", "-") for key in deformable)
        raise ValueError(f"{', '.join(flags)}: only for Deformable DETR presets, not --preset {args.preset}")
    arch.update(deformable)
    if args.norm:
        arch["norm"] = args.norm
    if args.dilation:
        arch["dilation"] = True
    if args.no_aux_loss:
        arch["aux_loss"] = False
    return arch


def run(args):
    from fqdetr.engine.train import TrainConfig
    from fqdetr.engine.train_job import TrainJob, run_train_job

    config = TrainConfig(
        epochs=args.epochs, lr=args.lr, lr_backbone=args.lr if args.lr_backbone is None else args.lr_backbone,
        weight_decay=args.weight_decay, lr_drop=args.lr_drop, clip_max_norm=args.clip_max_norm, out_dir=args.out,
        eval_every=args.eval_every, resume=args.resume, max_steps=args.max_steps,
        checkpoint_every=args.checkpoint_every, device=args.device, progress=not args.no_progress)
    run_train_job(TrainJob(
        data=args.data, train=config, image_size=args.image_size, canvas=args.canvas, batch_size=args.batch_size,
        num_workers=args.num_workers, train_limit=args.train_limit, val_limit=args.val_limit, preset=args.preset,
        arch=_arch(args), eos_coef=args.eos_coef, seed=args.seed, threads=args.threads, export=args.export,
        init_backbone=args.init_backbone,
        command=" ".join(["fqdetr"] + sys.argv[1:]) if sys.argv else ""))
    return 0
