"""ResNet backbone for DETR, written without torchvision.

Parameter names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1``..``layer4``,
blocks with ``conv1/bn1/conv2/bn2[/conv3/bn3]`` and ``downsample.0/.1``) and the
``Joiner`` wrapper puts them under ``backbone.0.body.*`` exactly as in the official
facebookresearch/detr checkpoints, so those load without renaming.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .misc import NestedTensor
from .position_encoding import PositionEmbeddingSine

# name -> (block type, blocks per stage)
RESNET_SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}

# DETR trains only these stages of a pretrained backbone; stem and layer1 stay frozen.
DETR_TRAINABLE_LAYERS = ("layer2", "layer3", "layer4")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers).

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, per channel.
    Detection batches are small, so DETR freezes the ImageNet statistics; the affine
    terms are buffers too, so they never reach an optimizer.
    """

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # torchvision / nn.BatchNorm2d checkpoints carry this counter; it means nothing here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        # Fold into one scale and shift (reshape once) rather than four broadcasts.
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _norm_factory(norm: str):
    if norm == "frozen":
        return FrozenBatchNorm2d
    if norm == "batch":
        return nn.BatchNorm2d
    raise ValueError(f"norm must be 'frozen' or 'batch', got {norm!r}")


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with identity shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1, norm_layer=FrozenBatchNorm2d):
        super().__init__()
        # Unlike torchvision we allow dilation here, so R18/R34 also have a DC5 variant.
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, torchvision "v1.5") -> 1x1 with 4x expansion (ResNet-50/101)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1, norm_layer=FrozenBatchNorm2d):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBody(nn.Module):
    """ResNet trunk up to ``layer4`` (no avgpool/fc, as DETR's IntermediateLayerGetter).

    ``width`` is the stem/first-stage width (64 in the standard nets); smaller values give
    cheap models with the same topology. Input [B, 3, H, W] -> [B, 8*width*expansion,
    H/32, W/32] (H/16 with the last stage dilated).
    """

    def __init__(self, name: str = "resnet50", width: int = 64, dilation: bool = False,
                 norm: str = "frozen"):
        super().__init__()
        if name not in RESNET_SPECS:
            raise ValueError(f"unknown backbone {name!r}; choose from {sorted(RESNET_SPECS)}")
        kind, blocks = RESNET_SPECS[name]
        self.block = BasicBlock if kind == "basic" else Bottleneck
        self.norm_layer = _norm_factory(norm)
        self.inplanes, self.dilation = width, 1
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = self.norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, blocks[0])
        self.layer2 = self._make_layer(width * 2, blocks[1], stride=2)
        self.layer3 = self._make_layer(width * 4, blocks[2], stride=2)
        self.layer4 = self._make_layer(width * 8, blocks[3], stride=2, dilate=dilation)
        self.num_channels = width * 8 * self.block.expansion
        self._init_weights()

    def _make_layer(self, planes: int, n: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:  # DC5: keep resolution, grow the receptive field instead
            self.dilation *= stride
            stride = 1
        out_ch = planes * self.block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_ch:
            downsample = nn.Sequential(_conv1x1(self.inplanes, out_ch, stride), self.norm_layer(out_ch))
        layers = [self.block(self.inplanes, planes, stride, downsample, previous_dilation, self.norm_layer)]
        self.inplanes = out_ch
        layers += [self.block(out_ch, planes, 1, None, self.dilation, self.norm_layer) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # torchvision's initialisation (matters only when not loading pretrained weights)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] -> [B, num_channels, H', W']."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class Backbone(nn.Module):
    """ResNet body plus mask handling: NestedTensor in, NestedTensor at stride 32 out.

    ``train_backbone=False`` freezes everything; otherwise only parameters whose name
    contains one of ``trainable_layers`` train (DETR: layer2-4).
    """

    def __init__(self, name: str = "resnet50", train_backbone: bool = True, dilation: bool = False,
                 width: int = 64, norm: str = "frozen",
                 trainable_layers: Sequence[str] = DETR_TRAINABLE_LAYERS):
        super().__init__()
        self.body = ResNetBody(name, width=width, dilation=dilation, norm=norm)
        self.num_channels = self.body.num_channels
        for pname, p in self.body.named_parameters():
            trainable = train_backbone and any(layer in pname for layer in trainable_layers)
            p.requires_grad_(trainable)

    def forward(self, samples: NestedTensor) -> NestedTensor:
        """tensors [B, 3, H, W], mask [B, H, W] -> features [B, C, h, w], mask [B, h, w]."""
        feats = self.body(samples.tensors)
        # Nearest interpolation of the padding mask to the feature grid, as DETR.
        mask = F.interpolate(samples.mask[None].float(), size=feats.shape[-2:])[0].to(torch.bool)
        return NestedTensor(feats, mask)


class Joiner(nn.Sequential):
    """``backbone.0`` = Backbone, ``backbone.1`` = position encoding (no parameters)."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, samples: NestedTensor) -> Tuple[NestedTensor, Tensor]:
        """-> (features NestedTensor [B, C, h, w] / [B, h, w], pos [B, d, h, w])."""
        feats = self[0](samples)
        pos = self[1](feats).to(feats.tensors.dtype)
        return feats, pos


def build_backbone(name: str = "resnet50", hidden_dim: int = 256, train_backbone: bool = True,
                   dilation: bool = False, width: int = 64, norm: str = "frozen",
                   trainable_layers: Optional[Sequence[str]] = None) -> Joiner:
    """Backbone + sine position encoding with hidden_dim // 2 features per axis."""
    layers = DETR_TRAINABLE_LAYERS if trainable_layers is None else tuple(trainable_layers)
    body = Backbone(name, train_backbone=train_backbone, dilation=dilation, width=width,
                    norm=norm, trainable_layers=layers)
    return Joiner(body, PositionEmbeddingSine(hidden_dim // 2, normalize=True))
