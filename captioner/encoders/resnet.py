"""The torchvision ResNets (`resnet50`, `resnet101`, `resnet152`, 2048-d): ImageNet weights downloaded when
online (IMAGENET1K_V2), or read from a local file given as `weights=PATH`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from captioner.encoders.registry import Builder, register_encoder
from captioner.encoders.weights import (
    EncoderUnavailableError,
    download_state_dict,
    load_strict,
    random_fallback,
    weights_label,
    weights_state,
)


class _ResNetPooled(nn.Module):
    """A torchvision ResNet without its classifier: (B, 3, H, W) -> (B, 2048) average-pooled features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(images))))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))  # (B, 2048, H/32, W/32)
        return torch.flatten(m.avgpool(x), 1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.fc(self(images))


def _resnet_builder(arch: str, weights_enum_name: str) -> Builder:
    def build(weights: Path | Mapping[str, torch.Tensor] | None, allow_random: bool) -> tuple[nn.Module, str]:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None)
        if weights is not None:
            load_strict(model, weights_state(weights), weights_label(weights))
            return _ResNetPooled(model), weights_label(weights)
        weights_enum = getattr(torchvision.models, weights_enum_name).IMAGENET1K_V2
        try:
            state = download_state_dict(weights_enum)
        except Exception as error:
            reason = (f"could not download its ImageNet weights from {weights_enum.url} "
                      f"({type(error).__name__}: {error})")
            if allow_random:
                return _ResNetPooled(model), random_fallback(arch, reason)
            raise EncoderUnavailableError(
                f"encoder {arch!r}: {reason}. There seems to be no network here. Download that file on a "
                f"machine with internet access and pass it as weights=PATH (CLI: --encoder-weights PATH), "
                f"or use the offline encoder 'efficientnet_lite0'."
            ) from None
        load_strict(model, state, weights_enum.url)
        return _ResNetPooled(model), weights_enum.url

    build.__name__ = f"_build_{arch}"
    return build


for _arch, _enum in (("resnet50", "ResNet50_Weights"), ("resnet101", "ResNet101_Weights"),
                     ("resnet152", "ResNet152_Weights")):
    register_encoder(
        _arch,
        feature_dim=2048,
        input_size=224,
        resize="shorter_side_crop",
        resize_size=232,  # torchvision's IMAGENET1K_V2 transforms: resize 232, centre crop 224
        mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
        std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
        description=f"torchvision {_arch} (ImageNet IMAGENET1K_V2 weights; needs network or weights=PATH)",
    )(_resnet_builder(_arch, _enum))
