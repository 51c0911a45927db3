"""Packed integer checkpoints of a quantized DETR / Deformable DETR.

    save_packed(qmodel, "model.fqp")        # weights as b-bit codes, densely packed
    qmodel = load_packed("model.fqp")       # the same quantized model, bit-exact outputs

The file is a torch file of plain containers (loads with ``weights_only=True``):
``{"header": JSON text, "codes": {state key: uint8 packed codes}, "state": {state key: tensor}}``.
The header names the detector family and its config, each quantized layer's
LayerQuantConfig, the layers left in float, the bit-width and shape of every packed
weight and the quantizers' extra state (bits, signed). ``state`` is the float remainder:
biases, norms, embeddings and every quantizer scale. A weight is stored as its integer
codes round(W / s) clamped to its bit-width (docs/METHOD.md section 5); loading sets the
weight to codes * s, whose fake quantization is itself, so the loaded model computes
exactly what the saved one did (its latent float weights are not kept).
"""
import dataclasses
import json
import os

import torch

from fqdetr.export.bitpack import pack_codes, packed_nbytes, unpack_codes
from fqdetr.io import atomic_torch_save
from fqdetr.models.checkpoint import checkpoint_family, model_from_checkpoint
from fqdetr.quant import QuantConfig, QuantMultiheadAttention, quantize_model, quantized_modules, quantized_weights
from fqdetr.quant.swap import _swap_target
from fqkernels import reference

FORMAT = "fqdetr-packed"
VERSION = 1
_HEADER_FIELDS = {"config": dict, "quant_layers": dict, "float_layers": list, "weights": dict, "extra_state": dict,
                  "metadata": dict}


def _weight_key(name, module):
    return f"{name}.in_proj_weight" if isinstance(module, QuantMultiheadAttention) else f"{name}.weight"


def _swapped_layers(model):
    """{name: LayerQuantConfig dict} of the layers quantize_model swapped (an attention's
    out_proj comes with its attention layer)."""
    modules = quantized_modules(model)
    owned = {f"{n}.out_proj" for n, m in modules.items() if isinstance(m, QuantMultiheadAttention)}
    return {n: dataclasses.asdict(m.quant_config) for n, m in modules.items() if n not in owned}


def _header(model, weights, extra_state, metadata):
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise ValueError(f"model: expected a quantized DETR / Deformable DETR carrying .config, got "
                         f"{type(model).__name__} without one")
    float_layers = [n for n, m in model.named_modules() if _swap_target(m) is not None]
    return {"format": FORMAT, "version": VERSION, "family": checkpoint_family(model.state_dict()),
            "config": config, "quant_layers": _swapped_layers(model), "float_layers": float_layers,
            "weights": weights, "extra_state": extra_state, "metadata": metadata or {}}


def _aliases(model):
    """{state key: the first key of the same tensor} for every state entry that a module
    registered under two names repeats (box refinement's decoder holds the head's box layers
    as transformer.decoder.bbox_embed.*, the same modules as bbox_embed.*)."""
    first, aliases = {}, {}
    for key, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor):
            continue
        if id(value) in first:
            aliases[key] = first[id(value)]
        else:
            first[id(value)] = key
    return aliases


@torch.no_grad()
def save_packed(model, path, metadata=None):
    """Writes the quantized ``model`` to ``path`` atomically; returns the path.

    metadata: JSON-serialisable extras kept in the header (e.g. categories, image size).
    """
    if not quantized_modules(model):
        raise ValueError("model: expected a quantized model (fqdetr.quant.quantize_model), found no quantized layer")
    codes, weights = {}, {}
    for name, (weight, wq) in quantized_weights(model).items():
        key = _weight_key(name, quantized_modules(model)[name])
        if not bool(wq.initialized):
            raise ValueError(f"{name}: weight quantizer has no scale yet (not initialised)")
        layer_codes = reference.integer_codes(weight.detach().float(), wq.scale.detach(), wq.bits, True, axis=0)
        codes[key] = pack_codes(layer_codes, wq.bits)
        weights[key] = {"layer": name, "bits": wq.bits, "shape": list(weight.shape)}
    state, extra_state, aliases = {}, {}, _aliases(model)
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            if key not in weights and key not in aliases:  # a shared tensor is stored once
                state[key] = value.detach().cpu().clone()
        else:
            extra_state[key] = value
    header = _header(model, weights, extra_state, metadata)
    return atomic_torch_save({"header": json.dumps(header), "codes": codes, "state": state}, path)


def _read(path):
    """(header dict, codes, state) of a packed file; ValueError naming the file when it is not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"packed checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        header = json.loads(payload["header"])
        codes, state = dict(payload["codes"]), dict(payload["state"])
    except Exception as err:  # torch: RuntimeError / UnpicklingError / EOFError; KeyError, TypeError, JSON
        raise ValueError(f"{path}: not a readable packed checkpoint: truncated, corrupt or another format "
                         f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"{path}: expected a {FORMAT} version {VERSION} header, got "
                         f"{header.get('format') if isinstance(header, dict) else type(header).__name__}")
    absent = [f"{k} ({kind.__name__})" for k, kind in _HEADER_FIELDS.items() if not isinstance(header.get(k), kind)]
    if absent:
        raise ValueError(f"{path}: header lacks {', '.join(absent)}")
    missing = sorted(set(header["weights"]) ^ set(codes))
    if missing:
        raise ValueError(f"{path}: packed codes and header disagree on weights {missing[:5]}")
    return header, codes, state


def _unpacked_weight(path, key, info, packed, scale):
    """codes * scale [shape] of one weight, with its checks."""
    shape, bits = info["shape"], info["bits"]
    count = torch.Size(shape).numel()
    codes = unpack_codes(packed, count, bits, what=f"{path}: weight {key} ({info['layer']})")
    if scale is None or scale.shape != (shape[0],) or not bool((scale > 0).all() & scale.isfinite().all()):
        raise ValueError(f"{path}: weight {key} needs {shape[0]} finite positive scales, got "
                         f"{None if scale is None else list(scale.shape)}")
    rows = codes.reshape(shape[0], -1).float() * scale.float()[:, None]
    return rows.reshape(shape)


def load_packed(path, with_metadata=False):
    """The quantized model saved by save_packed, in eval mode (and the header's metadata
    when ``with_metadata``). Corrupt files and codes that do not fit their bit-width raise
    ValueError naming the file and the weight."""
    header, codes, state = _read(path)
    sd = dict(state)
    for key, info in header["weights"].items():
        scale = state.get(f"{info['layer']}.weight_quantizer.scale")
        sd[key] = _unpacked_weight(path, key, info, codes[key], scale)
    float_model = model_from_checkpoint({"args": header["config"]}, sd)
    if checkpoint_family(sd) != header["family"]:
        raise ValueError(f"{path}: header says {header['family']}, the weights are a {checkpoint_family(sd)}")
    # every swappable layer is named, either quantized with its config or skipped
    config = QuantConfig(layers=header["quant_layers"], skip=header["float_layers"])
    model = quantize_model(float_model, config, inplace=True)
    sd.update(header["extra_state"])
    sd.update({alias: sd[key] for alias, key in _aliases(model).items() if alias not in sd and key in sd})
    model.load_state_dict(sd, strict=True)
    model.eval()
    return (model, header["metadata"]) if with_metadata else model

