"""Deformable DETR (fundamentalvision/Deformable-DETR architecture and parameter names)."""
from .backbone import MultiScaleBackbone, MultiScaleJoiner, build_multiscale_backbone
from .criterion import (DeformableSetCriterion, FocalHungarianMatcher, build_deformable_criterion,
                        deformable_weight_dict, sigmoid_focal_loss)
from .deformable_detr import (DEFORMABLE_PRESETS, DeformableDETR, build_deformable_detr,
                              deformable_detr_from_config)
from .ms_deform_attn import MSDeformAttn, ms_deform_attn_sample
from .postprocess import TopKPostProcess
from .transformer import DeformableTransformer, inverse_sigmoid

__all__ = [
    "DEFORMABLE_PRESETS", "DeformableDETR", "DeformableSetCriterion", "DeformableTransformer",
    "FocalHungarianMatcher", "MSDeformAttn", "MultiScaleBackbone", "MultiScaleJoiner", "TopKPostProcess",
    "build_deformable_criterion", "build_deformable_detr", "build_multiscale_backbone",
    "deformable_detr_from_config", "deformable_weight_dict", "inverse_sigmoid", "ms_deform_attn_sample",
    "sigmoid_focal_loss",
]
