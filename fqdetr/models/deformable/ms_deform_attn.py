"""Multi-scale deformable attention (Zhu et al. 2021), pure PyTorch.

Each query attends to ``n_points`` sampled locations per head and feature level instead
of to every key: the locations are its reference point plus learned offsets, the values
there are read by bilinear interpolation (``F.grid_sample``, zeros outside the map, as
the official CUDA kernel) and mixed with softmax weights predicted from the query; the
core runs fqkernels.ms_deform_attn (a C++ kernel on CPU, grid_sample otherwise).
Everything is differentiable twice (double backward goes through grid_sample), which the
Fisher regulariser needs. Parameter names follow fundamentalvision/Deformable-DETR:
``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``, all
``nn.Linear`` so ``fqdetr.quant.quantize_model`` swaps them like any other layer.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import fqkernels as fk

SpatialShapes = Sequence[Tuple[int, int]]


def check_spatial_shapes(spatial_shapes: SpatialShapes, length: int) -> List[Tuple[int, int]]:
    """[(H_l, W_l)] as Python ints; ValueError unless sum H_l * W_l == length. While traced
    (ONNX export), the sizes stay the traced values, so the graph takes any image size."""
    if torch.jit.is_tracing():
        return list(spatial_shapes)
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if sum(h * w for h, w in shapes) != length:
        raise ValueError(f"spatial_shapes {shapes} cover {sum(h * w for h, w in shapes)} positions, "
                         f"but the flattened input has {length}")
    return shapes


def ms_deform_attn_sample(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor,
                          attention_weights: Tensor) -> Tensor:
    """The attention core: weighted sum of bilinearly sampled values.

    value [N, S, M, D] (S = sum_l H_l W_l, levels concatenated row-major), spatial_shapes
    [(H_l, W_l)] * L, sampling_locations [N, Lq, M, L, P, 2] as (x, y) in [0, 1] of each
    level (0 and 1 are the outer edges of the border pixels; outside reads zeros),
    attention_weights [N, Lq, M, L, P] -> [N, Lq, M * D]. Runs fqkernels' op: the C++ kernel
    on CPU float32 / float64, F.grid_sample (fqkernels.reference) elsewhere, while exporting and
    for double backward (fqkernels/ms_deform_attn.py).
    """
    shapes = check_spatial_shapes(spatial_shapes, value.shape[1])
    if len(shapes) != sampling_locations.shape[3]:
        raise ValueError(f"{len(shapes)} spatial shapes for {sampling_locations.shape[3]} levels of "
                         "sampling_locations")
    return fk.ms_deform_attn(value, shapes, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with ``n_heads`` heads, ``n_levels`` levels and
    ``n_points`` sampling points per head and level."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: offsets start on a ring of n_heads directions, point
        i at distance i+1 (in pixels of each level), with uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]  # onto the unit square
        radii = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        grid = directions[:, None, None, :] * radii[None, None, :, None]  # [M, 1, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def sampling_locations(self, query: Tensor, reference_points: Tensor,
                           spatial_shapes: List[Tuple[int, int]]) -> Tensor:
        """query [N, Lq, d], reference_points [N, Lq, L, 2] (x, y) or [N, Lq, L, 4] boxes
        (cx, cy, w, h), normalised -> locations [N, Lq, M, L, P, 2] in [0, 1] (unclipped)."""
        n, lq, _ = query.shape
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l)
            # stacked, not torch.tensor(...): traced sizes (ONNX export) must stay inputs of the graph
            size = torch.stack([torch.stack([torch.as_tensor(w), torch.as_tensor(h)]) for h, w in spatial_shapes])
            size = size.to(device=query.device, dtype=query.dtype)
            return reference_points[:, :, None, :, None, :] + offsets / size[None, None, None, :, None, :]
        if reference_points.shape[-1] == 4:
            # offsets are fractions of the reference box's half size, spread over the points
            centre, wh = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
            return centre + offsets / self.n_points * wh * 0.5
        raise ValueError(f"reference_points must end in 2 (points) or 4 (boxes), got "
                         f"{tuple(reference_points.shape)}")

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                spatial_shapes: SpatialShapes, padding_mask: Optional[Tensor] = None) -> Tensor:
        """query [N, Lq, d]; reference_points [N, Lq, L, 2 or 4] in [0, 1] (see
        sampling_locations); input_flatten [N, S, d] (levels concatenated); spatial_shapes
        [(H_l, W_l)] * L; padding_mask [N, S] True on padding (those values read as zero)
        -> [N, Lq, d]."""
        n, lq, _ = query.shape
        s = input_flatten.shape[1]
        shapes = check_spatial_shapes(spatial_shapes, s)
        if len(shapes) != self.n_levels:
            raise ValueError(f"spatial_shapes has {len(shapes)} levels, the module {self.n_levels}")
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        locations = self.sampling_locations(query, reference_points, shapes)
        return self.output_proj(ms_deform_attn_sample(value, shapes, locations, weights))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
                f"n_points={self.n_points}")
