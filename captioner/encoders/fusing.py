"""BatchNorm folding: an eval-mode BatchNorm after a convolution becomes part of the convolution's weights."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def fuse_batchnorm_into_conv(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d into the Conv2d registered just before it in the same parent.

    That sibling order holds for `captioner.encoders.efficientnet_lite`, timm's EfficientNets and torchvision
    ResNets; `get_encoder` checks the fused model against the original on a random batch all the same.
    timm's BatchNormAct2d keeps its activation. Returns how many pairs were folded. In place; for inference only.
    """
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            tail = batchnorm_tail(bn)
            if tail is None or bn.running_mean is None or conv.out_channels != bn.num_features:
                continue
            scale = torch.rsqrt(bn.running_var + bn.eps)  # (C,)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            if conv.bias is not None:
                shift = shift + conv.bias * scale
            conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
            conv.bias = nn.Parameter(shift, requires_grad=False)
            setattr(parent, bn_name, tail)
            folded += 1
    return folded


def batchnorm_tail(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of a BatchNorm layer once its affine transform is folded away (None: do not fold)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):  # timm
        return nn.Sequential(bn.drop, bn.act)
    return None


def fused_copy_if_equivalent(model: nn.Module, input_size: int) -> nn.Module:
    fused = copy.deepcopy(model)
    if fuse_batchnorm_into_conv(fused) == 0:
        return model
    probe = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, actual = model(probe), fused(probe)
    tolerance = 1e-3 * max(1.0, expected.abs().max().item())
    if expected.shape != actual.shape or (expected - actual).abs().max().item() > tolerance:
        warnings.warn("BatchNorm folding changed the features; using the unfused model", stacklevel=3)
        return model
    return fused
