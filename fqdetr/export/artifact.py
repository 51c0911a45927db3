"""Any model file the commands take, recognised by its content: a float DETR / Deformable DETR
checkpoint, a quantized checkpoint, a packed file (fqdetr.export.packed) or an ONNX model.

    artifact = load_artifact("runs/ptq/quantized_state.pt")
    artifact.kind        # "float" | "quantized" | "packed" | "onnx"
    artifact.model       # forward((images [B, 3, H, W], mask [B, H, W])) -> {"pred_logits", "pred_boxes"}
    artifact.metadata    # the float checkpoint's categories, label_to_cat_id, num_classes,
                         # image_size and canvas (those it had), carried into every artifact

The metadata travels so that every form of a model is evaluated the same way: resized to
its training ``image_size`` and padded to its fixed ``canvas`` (the batch-size-invariant
protocol, fqdetr.data.PadToCanvas).

A quantized checkpoint is ``{"model": quantized state dict, "args": config, **metadata}``
(``fqdetr ptq`` writes one). A bare quantized state dict (``fqdetr qat``'s qat_state.pt) lacks
the config, so it loads only onto its float model (``fqdetr export --model M --quantized``).
Its layers are those quantize_detr's default config swaps; the bit-widths and scales come
from the state dict.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Dict

import torch
from torch import nn

from fqdetr.io import atomic_torch_save

METADATA_KEYS = ("categories", "label_to_cat_id", "num_classes", "image_size", "canvas")
PACKED_SUFFIX, ONNX_SUFFIX = ".fqp", ".onnx"
KINDS_HELP = (f"a float or quantized DETR / Deformable DETR checkpoint (.pth / .pt), a packed file "
              f"({PACKED_SUFFIX}, fqdetr ptq --packed) or an ONNX model ({ONNX_SUFFIX}, fqdetr export)")


@dataclass
class Artifact:
    """A loaded model file: its ``kind``, the runnable ``model`` (eval mode) and ``metadata``."""

    kind: str
    model: nn.Module
    metadata: Dict[str, Any] = field(default_factory=dict)


def checkpoint_metadata(ckpt):
    """The METADATA_KEYS entries of a checkpoint dict (those it has)."""
    return {k: ckpt[k] for k in METADATA_KEYS if ckpt.get(k) is not None}


def float_metadata(path, image_size=None):
    """checkpoint_metadata of the float checkpoint at ``path``, with the image size and canvas
    its model runs at (fqdetr.engine.setup.checkpoint_geometry; ``image_size`` overrides)."""
    from fqdetr.engine.setup import checkpoint_geometry
    from fqdetr.models.checkpoint import read_checkpoint

    image_size, canvas = checkpoint_geometry(path, image_size)
    return {**checkpoint_metadata(read_checkpoint(path)), "image_size": image_size, "canvas": canvas}


def _is_quantizer_key(key):
    """A state dict entry of a quantizer (weight_quantizer.scale, input_quantizers.0._extra_state...)."""
    return any(part.endswith(("_quantizer", "_quantizers")) for part in key.split(".")[:-1])


def is_quantized_state(sd):
    """Whether the state dict ``sd`` holds quantizers (a quantized model's state)."""
    return isinstance(sd, dict) and any(_is_quantizer_key(k) for k in sd)


def save_quantized_checkpoint(qmodel, path, metadata=None):
    """Writes ``{"model": qmodel's state dict, "args": qmodel.config, **metadata}`` atomically."""
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in qmodel.state_dict().items()}
    return atomic_torch_save({"model": state, "args": dict(qmodel.config), **(metadata or {})}, path)


def quantized_from_state(sd, path, float_model=None, config=None):
    """The quantized model of state dict ``sd`` (from file ``path``, named in errors): built on
    ``float_model``, else from ``config`` (a state dict's keys do not determine the architecture:
    head counts, dilation and norms leave no trace in them)."""
    from fqdetr.engine.quantize import quantize_detr
    from fqdetr.models.checkpoint import model_from_checkpoint

    if float_model is None:
        if not isinstance(config, dict):
            raise ValueError(f"{path}: a quantized state dict without its model config (e.g. fqdetr qat's "
                             f"qat_state.pt); give it with the float model it came from (fqdetr export --model "
                             f"FLOAT --quantized {path}), or use fqdetr ptq's quantized_state.pt")
        float_sd = {k: v for k, v in sd.items() if not _is_quantizer_key(k)}
        float_model = model_from_checkpoint({"args": config}, float_sd)
    qmodel = quantize_detr(float_model)
    expected = qmodel.state_dict()
    problems = {"missing": sorted(set(expected) - set(sd)), "unexpected": sorted(set(sd) - set(expected)),
                "shape mismatches": sorted(k for k in set(sd) & set(expected) if isinstance(sd[k], torch.Tensor)
                                           and sd[k].shape != expected[k].shape)}
    if any(problems.values()):
        detail = "; ".join(f"{title} {keys[:5]}" for title, keys in problems.items() if keys)
        raise ValueError(f"{path}: the quantized state does not fit the model it describes ({detail})")
    qmodel.load_state_dict(sd, strict=True)
    return qmodel.eval()


def _read_torch_file(path):
    from fqdetr.models.checkpoint import read_checkpoint

    try:
        return read_checkpoint(path)
    except ValueError as err:
        raise ValueError(f"{path}: not a model file fqdetr knows; expected {KINDS_HELP} ({err})") from err


def _kind(path, ckpt):
    """"packed", "quantized" or "float" for the torch file ``ckpt`` read from ``path``."""
    if isinstance(ckpt.get("header"), str) and "codes" in ckpt:
        return "packed"
    if is_quantized_state(ckpt.get("model", ckpt)):
        return "quantized"
    if isinstance(ckpt.get("model"), dict) or all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return "float"
    raise ValueError(f"{path}: not a model file fqdetr knows (keys {sorted(ckpt)[:8]}); expected {KINDS_HELP}")


def _onnx_or_read(path):
    """(None, ckpt) for a torch file at ``path``, ("onnx", None) for an .onnx file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model not found: {path}")
    return ("onnx", None) if path.endswith(ONNX_SUFFIX) else (None, _read_torch_file(path))


def model_kind(path):
    """"onnx", "packed", "quantized" or "float" for the file at ``path``; ValueError when it is none."""
    kind, ckpt = _onnx_or_read(path)
    return kind or _kind(path, ckpt)


def load_artifact(path):
    """The Artifact of the file at ``path``, recognised as model_kind says."""
    from fqdetr.export.onnx_runtime import OnnxDetector
    from fqdetr.export.packed import load_packed
    from fqdetr.models import load_detr_checkpoint

    kind, ckpt = _onnx_or_read(path)
    kind = kind or _kind(path, ckpt)
    if kind == "onnx":
        detector = OnnxDetector(path)
        return Artifact(kind, detector, detector.metadata)
    if kind == "packed":
        model, metadata = load_packed(path, with_metadata=True)
        return Artifact(kind, model, metadata)
    if kind == "quantized":
        sd = ckpt.get("model", ckpt)
        return Artifact(kind, quantized_from_state(sd, path, config=ckpt.get("args")), checkpoint_metadata(ckpt))
    return Artifact(kind, load_detr_checkpoint(path).eval(), checkpoint_metadata(ckpt))
