"""Reading and writing DETR and Deformable DETR checkpoints (official formats of
facebookresearch/detr and fundamentalvision/Deformable-DETR).

A checkpoint is ``{"model": state_dict, "args": ...}``. Official files carry an
``argparse.Namespace`` as args; ours carry the plain keyword arguments of
``detr_from_config`` / ``deformable_detr_from_config``. Which detector a file holds is
read from its state dict (``checkpoint_family``). Loading always uses ``weights_only=True``.
"""
import argparse
import inspect
import os
import re
import warnings
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from fqdetr.io import atomic_torch_save

from .backbone import RESNET_SPECS
from .deformable.deformable_detr import DeformableDETR, deformable_detr_from_config
from .detr import DETR, detr_from_config

_CONFIG_KEYS = ("num_classes", "backbone", "backbone_width", "dilation", "norm", "train_backbone",
                "trainable_layers", "hidden_dim", "nheads", "enc_layers", "dec_layers",
                "dim_feedforward", "dropout", "pre_norm", "num_queries", "aux_loss")


def read_checkpoint(path) -> Dict[str, Any]:
    """torch.load(weights_only=True) with a clear error for unreadable files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # Official DETR files pickle their argparse.Namespace; it is a plain attribute bag.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, KeyError, UnpicklingError, EOFError...
        raise ValueError(f"cannot read checkpoint {path}: truncated, corrupt or not a torch "
                         f"checkpoint ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict")
    return dict(ckpt)


def _state_dict_of(ckpt: Mapping, path) -> Dict[str, Tensor]:
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path} has no 'model' state dict")
    if any(k.startswith("detr.") for k in sd):
        # Panoptic checkpoints wrap DETR ("detr.*") and add a mask head we do not model.
        sd = {k[len("detr."):]: v for k, v in sd.items() if k.startswith("detr.")}
    return dict(sd)


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def _infer_backbone(sd: Mapping[str, Tensor]) -> str:
    body = "backbone.0.body."
    blocks = tuple(_count(sd, rf"{body}layer{i}\.(\d+)\.") for i in range(1, 5))
    kind = "bottleneck" if f"{body}layer1.0.conv3.weight" in sd else "basic"
    for name, spec in RESNET_SPECS.items():
        if spec == (kind, blocks):
            return name
    raise ValueError(f"cannot infer the ResNet from the checkpoint ({kind} blocks {blocks})")


def _args_dict(args) -> Dict[str, Any]:
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return dict(args) if isinstance(args, Mapping) else {}


def infer_config(sd: Mapping[str, Tensor], args=None) -> Dict[str, Any]:
    """Keyword arguments of detr_from_config from a state dict's keys and shapes.

    What shapes cannot tell (heads, dilation, dropout) comes from ``args`` when present,
    else DETR's defaults (8 heads, no dilation).
    """
    args = _args_dict(args)
    if "query_embed.weight" not in sd or "class_embed.weight" not in sd:
        raise ValueError("state dict lacks query_embed.weight / class_embed.weight: not a DETR")
    enc = _count(sd, r"transformer\.encoder\.layers\.(\d+)\.")
    dec = _count(sd, r"transformer\.decoder\.layers\.(\d+)\.")
    ffn_key = f"transformer.{'encoder' if enc else 'decoder'}.layers.0.linear1.weight"
    config = dict(
        num_classes=sd["class_embed.weight"].shape[0] - 1,
        backbone=_infer_backbone(sd),
        backbone_width=sd["backbone.0.body.conv1.weight"].shape[0],
        hidden_dim=sd["query_embed.weight"].shape[1], num_queries=sd["query_embed.weight"].shape[0],
        enc_layers=enc, dec_layers=dec, dim_feedforward=sd[ffn_key].shape[0],
        pre_norm="transformer.encoder.norm.weight" in sd)
    for key in ("nheads", "dilation", "dropout", "aux_loss", "norm", "train_backbone", "trainable_layers"):
        if key in args:
            config[key] = args[key]
    if args.get("position_embedding", "sine") not in ("sine", "v2"):
        raise ValueError(f"position_embedding={args['position_embedding']!r} is not supported (sine only)")
    return config


def _family_or_none(sd: Mapping[str, Tensor]) -> Optional[str]:
    if "transformer.level_embed" in sd:
        return "deformable_detr"
    if "query_embed.weight" in sd and "class_embed.weight" in sd:
        return "detr"
    return None


def checkpoint_family(sd: Mapping[str, Tensor]) -> str:
    """``"deformable_detr"`` (has ``transformer.level_embed``), ``"detr"`` (has
    ``query_embed.weight`` and ``class_embed.weight``), else ValueError."""
    family = _family_or_none(sd)
    if family is not None:
        return family
    raise ValueError(f"unknown architecture: the state dict is neither a DETR nor a Deformable DETR "
                     f"(first keys: {sorted(sd)[:5]})")


def _backbone_channels(sd: Mapping[str, Tensor], backbone: str, n_levels: int):
    """Output channels of the ResNet stages a Deformable DETR with n_levels reads."""
    expansion = 4 if RESNET_SPECS[backbone][0] == "bottleneck" else 1
    width = sd["backbone.0.body.conv1.weight"].shape[0]
    stages = (1, 2, 3) if n_levels > 1 else (3,)  # layer2..4, or layer4 alone
    return [width * 2 ** k * expansion for k in stages]


def _check_levels(sd: Mapping[str, Tensor], backbone: str, n_levels: int) -> None:
    n_proj = _count(sd, r"input_proj\.(\d+)\.")
    if n_proj != n_levels:
        raise ValueError(f"checkpoint has {n_levels} feature levels (transformer.level_embed) but "
                         f"{n_proj} input projections")
    expected = _backbone_channels(sd, backbone, n_levels)
    found = [sd[f"input_proj.{i}.0.weight"].shape[1] for i in range(n_levels)
             if sd[f"input_proj.{i}.0.weight"].shape[-1] == 1]  # the 1x1 backbone projections
    if found != expected:
        raise ValueError(f"checkpoint's {n_levels} feature levels do not match its backbone {backbone}: "
                         f"input projections read {found} channels, the backbone gives {expected}")


def infer_deformable_config(sd: Mapping[str, Tensor], args=None) -> Dict[str, Any]:
    """Keyword arguments of deformable_detr_from_config from a state dict's keys and shapes.

    Heads and sampling points (which only their product fixes), dropout, and two-stage's
    query count come from ``args`` when present, else the official defaults (8, 4, 4, 300).
    """
    args = _args_dict(args)
    n_levels, hidden_dim = sd["transformer.level_embed"].shape
    backbone = _infer_backbone(sd)
    _check_levels(sd, backbone, n_levels)
    two_stage = "transformer.enc_output.weight" in sd
    config = dict(
        num_classes=sd["class_embed.0.weight"].shape[0], backbone=backbone,
        backbone_width=sd["backbone.0.body.conv1.weight"].shape[0], hidden_dim=hidden_dim,
        num_feature_levels=n_levels,
        enc_layers=_count(sd, r"transformer\.encoder\.layers\.(\d+)\."),
        dec_layers=_count(sd, r"transformer\.decoder\.layers\.(\d+)\."),
        dim_feedforward=sd["transformer.decoder.layers.0.linear1.weight"].shape[0],
        num_queries=args.get("num_queries", 300) if two_stage else sd["query_embed.weight"].shape[0],
        with_box_refine="transformer.decoder.bbox_embed.0.layers.0.weight" in sd, two_stage=two_stage,
        nheads=args.get("nheads", 8), enc_n_points=args.get("enc_n_points", 4),
        dec_n_points=args.get("dec_n_points", 4))
    for part in ("encoder", "decoder"):
        attn = "self_attn" if part == "encoder" else "cross_attn"
        rows = sd[f"transformer.{part}.layers.0.{attn}.attention_weights.weight"].shape[0]
        points = config[f"{part[:3]}_n_points"]
        if rows != config["nheads"] * n_levels * points:
            raise ValueError(f"{part} attention has {rows} weights per query, not nheads "
                             f"({config['nheads']}) x levels ({n_levels}) x points ({points}): "
                             f"give the checkpoint's nheads / {part[:3]}_n_points")
    for key in ("dilation", "dropout", "aux_loss", "norm", "train_backbone", "trainable_layers"):
        if key in args:
            config[key] = args[key]
    if args.get("position_embedding", "sine") != "sine":
        raise ValueError(f"position_embedding={args['position_embedding']!r} is not supported (sine only)")
    return config


# Keys added after checkpoints had been written: a checkpoint without one was made (and is
# rebuilt) with the builder's default, the behaviour before the key existed.
_LATER_KEYS = ("level_masks",)
_DEFORMABLE_KEYS = tuple(k for k in inspect.signature(deformable_detr_from_config).parameters if k not in _LATER_KEYS)

# family -> (builder, keys our own checkpoints store in args, inference from official files)
_FAMILIES = {"detr": (detr_from_config, _CONFIG_KEYS, infer_config),
             "deformable_detr": (deformable_detr_from_config, _DEFORMABLE_KEYS, infer_deformable_config)}


def model_from_checkpoint(ckpt: Mapping, sd: Mapping[str, Tensor], **overrides) -> nn.Module:
    """Rebuild the detector a checkpoint holds: from its args (ours) or inferred from its
    keys and shapes (official files), with ``overrides`` on top."""
    builder, keys, infer = _FAMILIES[checkpoint_family(sd)]
    args = _args_dict(ckpt.get("args"))
    config = {k: args[k] for k in keys} if args and all(k in args for k in keys) else infer(sd, args)
    config.update({k: args[k] for k in _LATER_KEYS if k in args})
    return builder(**{**config, **overrides})


def _mismatches(model: nn.Module, sd: Mapping[str, Tensor]):
    expected = model.state_dict()
    # nn.BatchNorm2d counters are meaningless for FrozenBatchNorm2d, which drops them.
    sd = {k: v for k, v in sd.items() if k in expected or not k.endswith("num_batches_tracked")}
    # ... and a FrozenBatchNorm2d file (official checkpoints) has none for an nn.BatchNorm2d model.
    missing = sorted(k for k in set(expected) - set(sd) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    return sd, missing, unexpected, shapes


def _describe(path, missing, unexpected, shapes, limit: int = 20) -> str:
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return f"checkpoint {path} does not fit the model: " + "; ".join(parts)


def load_detr_checkpoint(path, model: Optional[nn.Module] = None, strict: bool = True,
                         **overrides) -> nn.Module:
    """Load a DETR or Deformable DETR checkpoint (official, or saved by
    save_detr_checkpoint) into ``model``.

    With ``model=None`` the detector the file holds is rebuilt (model_from_checkpoint);
    an unknown architecture raises ValueError. A checkpoint of the other family than a
    given ``model`` raises ValueError too. ``strict=True`` raises ValueError listing missing/unexpected
    keys and shape mismatches; ``strict=False`` loads the keys that fit and warns.
    """
    ckpt = read_checkpoint(path)
    sd = _state_dict_of(ckpt, path)
    if model is None:
        model = model_from_checkpoint(ckpt, sd, **overrides)
    elif isinstance(model, (DETR, DeformableDETR)):
        # a file of the other family would fail on every key: say so instead
        family, expected = _family_or_none(sd), _family_or_none(model.state_dict())
        if family not in (None, expected):
            raise ValueError(f"checkpoint {path} holds a {family}, the model given is a {expected}")
    sd, missing, unexpected, shapes = _mismatches(model, sd)
    if missing or unexpected or shapes:
        message = _describe(path, missing, unexpected, shapes)
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
        bad = {s.split(":")[0] for s in shapes}
        sd = {k: v for k, v in sd.items() if k not in bad and k not in unexpected}
    model.load_state_dict(sd, strict=False)
    return model


def save_detr_checkpoint(model: nn.Module, path, args: Optional[Mapping] = None,
                         extra: Optional[Mapping] = None) -> None:
    """Write {"model": state_dict, "args": args or model.config, **extra} atomically.

    The file is written to a temporary name in the same directory and renamed, so a
    crash never leaves a truncated checkpoint at ``path``.
    """
    path = os.fspath(path)
    args = dict(getattr(model, "config", {}) if args is None else args)
    payload = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "args": args}
    payload.update(extra or {})
    atomic_torch_save(payload, path)


def load_resnet_weights(model: nn.Module, path) -> nn.Module:
    """Load ResNet weights into a DETR's or Deformable DETR's backbone body (``backbone.0.body``):
    from a torchvision-format ImageNet file (e.g. resnet50-0676ba61.pth; its classifier ``fc``
    is ignored) or from a DETR / Deformable DETR checkpoint, ours or official (its
    ``backbone.0.body.*``; the rest of the file is ignored). Strict otherwise: ValueError
    listing missing keys and shape mismatches (e.g. another backbone width)."""
    ckpt = read_checkpoint(path)
    if "model" in ckpt:  # a detector checkpoint: its backbone body
        body_prefix = "backbone.0.body."
        sd = {k[len(body_prefix):]: v for k, v in _state_dict_of(ckpt, path).items() if k.startswith(body_prefix)}
    else:
        sd = {k: v for k, v in ckpt.get("state_dict", ckpt).items() if not k.startswith("fc.")}
    body = model.backbone[0].body
    sd, missing, unexpected, shapes = _mismatches(body, sd)
    if missing or unexpected or shapes:
        raise ValueError(_describe(path, missing, unexpected, shapes))
    body.load_state_dict(sd, strict=False)
    return model
