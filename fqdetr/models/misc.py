"""Padded image batches (DETR's ``NestedTensor``)."""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor


@dataclass
class NestedTensor:
    """A padded batch: ``tensors`` [B, C, H, W] and ``mask`` [B, H, W] (True on padding)."""

    tensors: Tensor
    mask: Optional[Tensor]

    def decompose(self):
        return self.tensors, self.mask

    def to(self, device, non_blocking: bool = False) -> "NestedTensor":
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)


def nested_tensor_from_tensor_list(images: Sequence[Tensor]) -> NestedTensor:
    """Pad a list of [C, H_i, W_i] images at bottom/right to one [B, C, H, W] batch."""
    if len(images) == 0:
        raise ValueError("nested_tensor_from_tensor_list: empty image list")
    c = images[0].shape[0]
    h = max(int(im.shape[1]) for im in images)
    w = max(int(im.shape[2]) for im in images)
    first = images[0]
    tensors = first.new_zeros((len(images), c, h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=first.device)
    for i, im in enumerate(images):
        tensors[i, :, : im.shape[1], : im.shape[2]].copy_(im)
        mask[i, : im.shape[1], : im.shape[2]] = False
    return NestedTensor(tensors, mask)


SampleLike = Union[NestedTensor, Tensor, tuple, List[Tensor]]


def to_nested_tensor(samples: SampleLike) -> NestedTensor:
    """Accept a NestedTensor, an (images, mask) pair, a [B, 3, H, W] tensor (no padding)
    or a list of [3, H_i, W_i] images, and return a NestedTensor with a boolean mask."""
    if isinstance(samples, NestedTensor):
        out = samples
    elif isinstance(samples, Tensor):
        out = NestedTensor(samples, None)
    elif (isinstance(samples, tuple) and len(samples) == 2 and isinstance(samples[0], Tensor)
          and samples[0].dim() == 4):  # (images, mask); a tuple of 3-D images is a list
        out = NestedTensor(samples[0], samples[1])
    elif isinstance(samples, (list, tuple)):
        return nested_tensor_from_tensor_list(list(samples))
    else:
        raise TypeError(f"unsupported input type {type(samples).__name__} for DETR")
    x, mask = out.tensors, out.mask
    if x.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(x.shape)}")
    if mask is None:
        mask = torch.zeros((x.shape[0], x.shape[2], x.shape[3]), dtype=torch.bool, device=x.device)
    if mask.shape != (x.shape[0], x.shape[2], x.shape[3]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match images {tuple(x.shape)}")
    return NestedTensor(x, mask.to(torch.bool))
