"""Sine position encoding of DETR ("Attention is all you need", extended to 2-D)."""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .misc import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine/cosine encoding computed from the padding mask.

    Coordinates are cumulative counts of valid (non-padding) pixels, so padding does not
    shift the encoding of real pixels; with ``normalize`` they are rescaled to
    (0, scale] per image, making the encoding independent of image size.
    Output channels: num_pos_feats for y, then num_pos_feats for x. ``offset`` is
    subtracted from the counts before normalising (Deformable DETR uses 0.5: pixel centres).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0,
                 normalize: bool = True, scale: Optional[float] = None, offset: float = 0.0):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset

    def forward(self, x: NestedTensor) -> Tensor:
        """x.mask [B, h, w] (True on padding) -> pos [B, 2*num_pos_feats, h, w] (fp32)."""
        not_mask = ~x.mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6  # an all-padding row/column would otherwise divide by zero
            y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # interleave sin (even channels) and cos (odd channels)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale:.4f}")
