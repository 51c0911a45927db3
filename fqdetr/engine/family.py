"""The one place that knows how the two detector families differ for the engine: which
presets build them, their criterion, their post-processing and how their class logits read.

DETR: softmax over C real classes plus a no-object column (``SetCriterion``, ``PostProcess``:
every query with its best real class). Deformable DETR: C independent sigmoids, no no-object
column (``DeformableSetCriterion`` with the focal loss, ``TopKPostProcess``: the best 100
(query, class) pairs). Every other engine and CLI module asks this one instead of testing the
family itself.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Tuple

from torch import nn

from fqdetr.models import (DEFORMABLE_PRESETS, PRESETS, DeformableDETR, PostProcess, TopKPostProcess,
                           build_criterion, build_deformable_criterion, build_deformable_detr, build_detr)

DETR, DEFORMABLE = "detr", "deformable_detr"  # fqdetr.models.checkpoint_family's names


@dataclass(frozen=True)
class Family:
    """How the engine builds, trains and reads one detector family.

    head: "softmax" (DETR: one no-object logit column past the real classes) or "sigmoid" (none),
    as fqdetr.critical and fqdetr.evaluation name them; criterion(num_classes, model config,
    eos_coef) -> the training criterion;
    postprocess() -> outputs + sizes -> detections; eight_bit_layers: fnmatch patterns of the
    layers kept at 8 bits (docs/METHOD.md section 5.4: the first convolution and the prediction
    heads); title: for reports.
    """

    name: str
    title: str
    presets: Mapping[str, Mapping[str, Any]]
    build: Callable[..., nn.Module]
    criterion: Callable[[int, Mapping[str, Any], float], nn.Module]
    postprocess: Callable[[], nn.Module]
    head: str
    eight_bit_layers: Tuple[str, ...]


def _detr_criterion(num_classes: int, config: Mapping[str, Any], eos_coef: float) -> nn.Module:
    return build_criterion(num_classes, dec_layers=config.get("dec_layers", 6),
                           aux_loss=config.get("aux_loss", True), eos_coef=eos_coef)


def _deformable_criterion(num_classes: int, config: Mapping[str, Any], eos_coef: float) -> nn.Module:
    del eos_coef  # the focal loss has no no-object class to down-weight
    return build_deformable_criterion(num_classes, dec_layers=config.get("dec_layers", 6),
                                      aux_loss=config.get("aux_loss", True),
                                      two_stage=config.get("two_stage", False))


FAMILIES: Dict[str, Family] = {
    DETR: Family(DETR, "DETR", PRESETS, build_detr, _detr_criterion, PostProcess, "softmax",
                 ("backbone.0.body.conv1", "class_embed", "bbox_embed.*")),
    # One head per decoder layer; with box refinement the decoder holds the same heads and
    # its names (transformer.decoder.bbox_embed.*) come first, hence the leading "*".
    DEFORMABLE: Family(DEFORMABLE, "Deformable DETR", DEFORMABLE_PRESETS, build_deformable_detr,
                       _deformable_criterion, TopKPostProcess, "sigmoid",
                       ("backbone.0.body.conv1", "*class_embed.*", "*bbox_embed.*")),
}


def family_of_preset(preset: str) -> Family:
    """The family whose presets include ``preset``; ValueError listing every preset otherwise."""
    for family in FAMILIES.values():
        if preset in family.presets:
            return family
    choices = sorted(p for f in FAMILIES.values() for p in f.presets)
    raise ValueError(f"--preset: unknown preset {preset!r}; choose from {choices}")


def family_of(model: nn.Module) -> Family:
    """The family of a built detector (a DeformableDETR, else DETR); an exported one
    (fqdetr.export.OnnxDetector) names its own in ``family_name``."""
    name = getattr(model, "family_name", None)
    return FAMILIES[name or (DEFORMABLE if isinstance(model, DeformableDETR) else DETR)]


def build_model(preset: str, num_classes: int, **arch) -> nn.Module:
    """The detector of ``preset`` (either family) with ``num_classes`` and keyword overrides."""
    return family_of_preset(preset).build(preset, num_classes=num_classes, **arch)


def num_classes_of(model: nn.Module) -> int:
    """Real classes a detector predicts (its class head's outputs less any no-object column)."""
    head = model.class_embed[0] if isinstance(model.class_embed, nn.ModuleList) else model.class_embed
    return head.out_features - (family_of(model).head == "softmax")


def criterion_for(model: nn.Module, eos_coef: float = 0.1) -> nn.Module:
    """The training criterion of ``model``'s family, sized from its config."""
    return family_of(model).criterion(num_classes_of(model), getattr(model, "config", {}), eos_coef)


def postprocess_for(model: nn.Module) -> nn.Module:
    """The post-processing of ``model``'s family (pred_logits / pred_boxes -> detections)."""
    return family_of(model).postprocess()


def class_probabilities(model: nn.Module, logits):
    """[..., Q, C(+1)] logits -> the family's probabilities: softmax (DETR, the no-object column
    kept last) or independent sigmoids (Deformable DETR)."""
    logits = logits.float()
    return logits.sigmoid() if family_of(model).head == "sigmoid" else logits.softmax(-1)
