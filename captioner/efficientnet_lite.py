"""EfficientNet-Lite in plain PyTorch: the network of timm's `tf_efficientnet_lite0` / `_lite2`, with the same
parameter names, so a state dict made for timm loads here strictly (and back).

Why not timm itself: importing timm pulls in torchvision and torch._dynamo, seconds of every
`captioner caption` start, for a network this small. timm stays the reference:
`tests/test_encoder.py` checks that both give the same features from the same weights.

Lite is EfficientNet without squeeze-and-excitation, with ReLU6, and with the stem (32 channels), the head
(1280) and the first and last stages kept at their base size when the network is scaled. The convolutions
use TensorFlow's "same" padding: symmetric for stride 1, and for stride 2 computed from the input size,
with the extra pixel on the bottom/right (`SameConv2d`). BatchNorm eps is TensorFlow's 1e-3. Each
convolution is followed by its BatchNorm as the next sibling module (what `encoder.fuse_batchnorm_into_conv`
folds); activations are applied in `forward`.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

# (block kind, kernel, stride, expansion, output channels) per stage, before width scaling
BASE_STAGES = (("ds", 3, 1, 1, 16), ("ir", 3, 2, 6, 24), ("ir", 5, 2, 6, 40), ("ir", 3, 2, 6, 80),
               ("ir", 5, 1, 6, 112), ("ir", 5, 2, 6, 192), ("ir", 3, 1, 6, 320))
STEM_CHANNELS, HEAD_CHANNELS, BN_EPS = 32, 1280, 1e-3
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage
LITE2_STAGE_DEPTHS = (1, 3, 3, 4, 4, 5, 1)  # Lite2 scales depth by 1.2 but keeps the first and last stage


def round_channels(channels: float, divisor: int = 8) -> int:
    """Width-scaled channels rounded to a multiple of `divisor`, never more than 10% below the target."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class SameConv2d(nn.Conv2d):
    """A strided convolution with TensorFlow's "same" padding, computed for each input size.

    The padding is `total // 2` on the top/left and the rest on the bottom/right, so the two sides differ
    by at most one pixel. Rather than copying the input into a padded tensor (timm's way, whose copies
    cost a noticeable share of the network's time), the convolution pads symmetrically with the larger
    amount and, where the sides differ, the kernel gets a leading row/column of zeros, which shifts every
    window by one pixel: the same sums, without the copy.
    """

    def forward(self, x: Tensor) -> Tensor:
        padding, lead = [], []
        for size, kernel, stride in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):  # H, W
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            padding.append(total - total // 2)
            lead.append(total % 2)
        weight = F.pad(self.weight, [lead[1], 0, lead[0], 0]) if any(lead) else self.weight
        return F.conv2d(x, weight, self.bias, self.stride, tuple(padding), self.dilation, self.groups)


def conv(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:
        return nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, groups=groups, bias=False)
    return SameConv2d(in_channels, out_channels, kernel, stride=stride, groups=groups, bias=False)


def batchnorm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class DepthwiseSeparable(nn.Module):
    """Depthwise k×k (BN, ReLU6), then pointwise projection (BN); residual when the shape allows."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.conv_dw = conv(in_channels, in_channels, kernel, stride, groups=in_channels)
        self.bn1 = batchnorm(in_channels)
        self.conv_pw = conv(in_channels, out_channels)
        self.bn2 = batchnorm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)), inplace=True)))
        return x + y if self.residual else y


class InvertedResidual(nn.Module):
    """Pointwise expansion (BN, ReLU6), depthwise k×k (BN, ReLU6), pointwise projection (BN); residual when
    the shape allows."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        middle = round_channels(in_channels * expansion)
        self.conv_pw = conv(in_channels, middle)
        self.bn1 = batchnorm(middle)
        self.conv_dw = conv(middle, middle, kernel, stride, groups=middle)
        self.bn2 = batchnorm(middle)
        self.conv_pwl = conv(middle, out_channels)
        self.bn3 = batchnorm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self.bn1(self.conv_pw(x)), inplace=True)
        y = F.relu6(self.bn2(self.conv_dw(y)), inplace=True)
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """`forward` gives the globally average-pooled 1280-d features; `classify` the 1000 ImageNet logits."""

    def __init__(self, width: float, stage_depths: tuple[int, ...], num_classes: int = 1000):
        super().__init__()
        if len(stage_depths) != len(BASE_STAGES):
            raise ValueError(f"stage_depths: expected {len(BASE_STAGES)} stages, got {len(stage_depths)}")
        self.conv_stem = conv(3, STEM_CHANNELS, 3, stride=2)
        self.bn1 = batchnorm(STEM_CHANNELS)
        stages, channels = [], STEM_CHANNELS
        for (kind, kernel, stride, expansion, base_out), depth in zip(BASE_STAGES, stage_depths, strict=True):
            out = round_channels(base_out * width)
            blocks = []
            for index in range(depth):
                block_stride = stride if index == 0 else 1
                blocks.append(DepthwiseSeparable(channels, out, kernel, block_stride) if kind == "ds" else
                              InvertedResidual(channels, out, kernel, block_stride, expansion))
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = conv(channels, HEAD_CHANNELS)
        self.bn2 = batchnorm(HEAD_CHANNELS)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = F.relu6(self.bn1(self.conv_stem(images)), inplace=True)
        x = F.relu6(self.bn2(self.conv_head(self.blocks(x))), inplace=True)
        return x.mean(dim=(2, 3))  # (B, 1280)

    def classify(self, images: Tensor) -> Tensor:
        return self.classifier(self(images))


def efficientnet_lite0() -> EfficientNetLite:
    return EfficientNetLite(width=1.0, stage_depths=LITE0_STAGE_DEPTHS)


def efficientnet_lite2() -> EfficientNetLite:
    return EfficientNetLite(width=1.1, stage_depths=LITE2_STAGE_DEPTHS)
