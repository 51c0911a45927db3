"""DETR (facebookresearch/detr) and Deformable DETR (fundamentalvision/Deformable-DETR),
with their architectures and parameter names, without quantization.

Nothing here knows about quantization: fqdetr.quant swaps modules from outside.
"""
from . import box_ops
from .backbone import Backbone, FrozenBatchNorm2d, Joiner, ResNetBody, build_backbone
from .checkpoint import (checkpoint_family, infer_config, infer_deformable_config, load_detr_checkpoint,
                         load_resnet_weights, model_from_checkpoint, save_detr_checkpoint)
from .criterion import SetCriterion, build_criterion, detr_weight_dict, weighted_loss
from .deformable import (DEFORMABLE_PRESETS, DeformableDETR, DeformableSetCriterion, DeformableTransformer,
                         FocalHungarianMatcher, MSDeformAttn, TopKPostProcess, build_deformable_criterion,
                         build_deformable_detr, deformable_detr_from_config, deformable_weight_dict,
                         ms_deform_attn_sample, sigmoid_focal_loss)
from .detr import DETR, MLP, PRESETS, build_detr, detr_from_config
from .matcher import HungarianMatcher
from .misc import NestedTensor, nested_tensor_from_tensor_list, to_nested_tensor
from .position_encoding import PositionEmbeddingSine
from .postprocess import PostProcess
from .transformer import Transformer

__all__ = [
    "DEFORMABLE_PRESETS", "DeformableDETR", "DeformableSetCriterion", "DeformableTransformer",
    "FocalHungarianMatcher", "MSDeformAttn", "TopKPostProcess", "build_deformable_criterion",
    "build_deformable_detr", "checkpoint_family", "deformable_detr_from_config", "deformable_weight_dict",
    "infer_deformable_config", "model_from_checkpoint", "ms_deform_attn_sample", "sigmoid_focal_loss",
    "Backbone", "DETR", "FrozenBatchNorm2d", "HungarianMatcher", "Joiner", "MLP", "NestedTensor",
    "PRESETS", "PositionEmbeddingSine", "PostProcess", "ResNetBody", "SetCriterion", "Transformer",
    "box_ops", "build_backbone", "build_criterion", "build_detr", "detr_from_config",
    "detr_weight_dict", "infer_config", "load_detr_checkpoint", "load_resnet_weights",
    "nested_tensor_from_tensor_list", "save_detr_checkpoint", "to_nested_tensor", "weighted_loss",
]
