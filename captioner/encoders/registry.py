"""The encoder registry: named pretrained CNNs that turn an image into one pooled feature vector.

    encoder = get_encoder("efficientnet_lite0")           # offline default, 1280-d
    pixels = encoder.preprocess(load_image("dog.jpg"))    # (3, 224, 224) float32
    features = encoder(pixels[None])                      # (1, 1280)

The architectures register themselves from their own modules (`captioner.encoders.efficientnet_lite`,
`captioner.encoders.resnet`), which `captioner.encoders` imports.

Adding an encoder: write a function `(weights, allow_random: bool) -> (nn.Module, str)` that returns a
module mapping normalised images (B, 3, H, W) to pooled features (B, feature_dim), plus a few words saying
where its weights came from; `weights` is None (default source), a local file, or a state dict already
in memory (a fine-tuned CNN carried by a checkpoint): read the last two with `weights_state(weights)`
(`captioner.encoders.weights`). Raise `EncoderUnavailableError` when the weights cannot be had and
`allow_random` is False. Then register it with its preprocessing:

    @register_encoder("my_net", feature_dim=768, input_size=224, resize="squash",
                      mean=(127.5,) * 3, std=(127.5,) * 3)
    def _build_my_net(weights, allow_random): ...

The module may also define `classify(images) -> (B, num_classes)` logits (used by tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from captioner.encoders.fusing import fused_copy_if_equivalent
from captioner.encoders.identity import check_same_cnn
from captioner.encoders.preprocessing import Preprocessor, ResizeMode
from captioner.encoders.weights import EncoderUnavailableError, NamedState, state_dict_hash, weights_label

__all__ = ["DEFAULT_ENCODER", "Builder", "Encoder", "EncoderSpec", "EncoderUnavailableError", "Weights",
           "check_trained_cnn", "checkpoint_encoder", "get_encoder", "get_encoder_spec", "list_encoders",
           "register_encoder"]

DEFAULT_ENCODER = "efficientnet_lite0"
Weights = str | Path | Mapping[str, torch.Tensor] | None  # default source, local file, or a state dict
Builder = Callable[[Path | Mapping[str, torch.Tensor] | None, bool], tuple[nn.Module, str]]


@dataclass(frozen=True)
class EncoderSpec:
    """How to build a backbone and prepare its input.

    mean, std: per-channel normalisation in 0..255 pixel terms: input = (pixel - mean) / std, where pixel
        is the 8-bit value. (ImageNet's 0..1 mean 0.485 becomes 0.485 * 255 here.)
    resize: "squash" resizes to input_size × input_size ignoring the aspect ratio; "shorter_side_crop"
        resizes the shorter side to resize_size and takes a centre input_size square (torchvision style).
    Resizing is PIL bilinear, which is antialiased when shrinking.
    """

    name: str
    feature_dim: int
    input_size: int
    resize: ResizeMode
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    builder: Builder = field(repr=False, compare=False)
    resize_size: int | None = None  # shorter side before the crop ("shorter_side_crop" only)
    description: str = ""

    def build(self, weights: Weights = None, allow_random: bool = False) -> nn.Module:
        """The backbone in eval mode: normalised images (B, 3, H, W) -> pooled features (B, feature_dim)."""
        return self._build(weights, allow_random)[0]

    def _build(self, weights: Weights, allow_random: bool) -> tuple[nn.Module, str]:
        if isinstance(weights, (str, os.PathLike)):
            weights = Path(weights)
        module, source = self.builder(weights, allow_random)
        return module.eval(), source

    def preprocessing(self) -> dict:
        """A JSON-able description of the preprocessing; feature caches compare it to refuse mixing."""
        description = {
            "resize": self.resize,
            "input_size": self.input_size,
            "interpolation": "PIL bilinear (antialiased)",
            "mean_0_255": list(self.mean),
            "std_0_255": list(self.std),
        }
        if self.resize == "shorter_side_crop":
            description["resize_size"] = self.resize_size
        return description



class Encoder:
    """A built backbone with its spec, its preprocessing and a short hash of the weights it runs."""

    def __init__(self, spec: EncoderSpec, model: nn.Module, weights_hash: str, weights_source: str) -> None:
        self.spec = spec
        self.model = model
        self.weights_hash = weights_hash
        self.weights_source = weights_source
        self.preprocessor = Preprocessor(spec)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Encoder:
        self.model.to(device)
        return self

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image (see `captioner.images.load_image`) -> normalised float32 (3, H, W)."""
        return self.preprocessor(image)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> pooled features (B, feature_dim), without autograd."""
        with torch.inference_mode():
            return self.model(images.to(self.device))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000), for backbones that keep their classifier."""
        if not hasattr(self.model, "classify"):
            raise NotImplementedError(f"encoder {self.name!r} has no classifier")
        with torch.inference_mode():
            return self.model.classify(images.to(self.device))

    def __repr__(self) -> str:
        return f"Encoder({self.name!r}, feature_dim={self.feature_dim}, weights_hash={self.weights_hash!r})"


_REGISTRY: dict[str, EncoderSpec] = {}



def register_encoder(
    name: str,
    *,
    feature_dim: int,
    input_size: int,
    resize: ResizeMode,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    resize_size: int | None = None,
    description: str = "",
) -> Callable[[Builder], Builder]:
    """Decorator: register `builder` under `name` with its preprocessing (see the module docstring)."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = EncoderSpec(
            name=name, feature_dim=feature_dim, input_size=input_size, resize=resize, mean=mean, std=std,
            builder=builder, resize_size=resize_size, description=description or (builder.__doc__ or "").strip(),
        )
        return builder

    return decorate


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def get_encoder_spec(name: str) -> EncoderSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; available: {', '.join(list_encoders())}") from None


def get_encoder(name: str = DEFAULT_ENCODER, weights: Weights = None,
                allow_random: bool = False, fuse_batchnorm: bool = True) -> Encoder:
    """Build encoder `name` for inference, in eval mode on the CPU.

    weights: a local weights file (.pth/.pt via `torch.load(weights_only=True)`, or .safetensors), or a
        state dict (e.g. `Checkpoint.encoder_state`, a fine-tuned CNN); None uses the encoder's default
        source (packaged file or download).
    allow_random: if the default weights cannot be had, fall back to random weights with a warning instead
        of raising `EncoderUnavailableError`. Only for tests and smoke runs: random features mean nothing.
    fuse_batchnorm: fold eval-mode BatchNorm into the preceding convolutions (same features to ~1e-5,
        fewer operations at inference; `scripts/bench/features.py --no-fuse-batchnorm` measures the gain).
        `weights_hash` is always that of the weights as loaded, before folding.
        Use `get_encoder_spec(name).build(...)` for an unfused module to fine-tune.
    """
    spec = get_encoder_spec(name)
    model, source = spec._build(weights, allow_random)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    digest = state_dict_hash(model.state_dict())
    if source.startswith("random"):
        digest = "random-" + digest
    if fuse_batchnorm:
        model = fused_copy_if_equivalent(model, spec.input_size)
    return Encoder(spec, model, digest, source)


def checkpoint_encoder(entry: Mapping[str, Any], owner: str, state: Mapping[str, torch.Tensor] | None = None,
                       weights: Weights = None, fuse_batchnorm: bool = True) -> Encoder:
    """The CNN a checkpoint was trained on, from its `encoder` entry (name, weights_hash, preprocessing):
    built with `weights` when given, else the weights the checkpoint carries (`state`, a fine-tuned CNN),
    else the entry's default source; refused unless the weights hash to the entry's weights_hash and the
    entry's preprocessing is this encoder's. `owner` names the checkpoint in the messages; `fuse_batchnorm`
    as in `get_encoder` (False when only the classifier will run)."""
    name = entry.get("encoder", DEFAULT_ENCODER)
    spec = get_encoder_spec(name)
    check_preprocessing(spec, entry.get("preprocessing"), owner)
    try:
        encoder = get_encoder(name, weights=weights if weights is not None else state, fuse_batchnorm=fuse_batchnorm)
    except EncoderUnavailableError as error:
        if weights is not None or state is None:
            raise
        source = state.source if isinstance(state, NamedState) else f"{owner}: its fine-tuned CNN"
        detail = str(error).removeprefix(f"{weights_label(state)}: ")
        raise EncoderUnavailableError(f"{source}: {detail}; the file is damaged or was written for another "
                                      f"encoder than {name}: use another checkpoint") from None
    check_trained_cnn(encoder, entry, owner)
    return encoder


PREPROCESSING_FIELDS = ("resize", "input_size", "resize_size", "mean_0_255", "std_0_255")


def check_preprocessing(spec: EncoderSpec, recorded: Mapping[str, Any] | None, owner: str) -> None:
    """Refuse a checkpoint trained on images prepared otherwise than `spec` prepares them (its recorded
    preprocessing differs in a field both describe): its decoder would see other features."""
    if not recorded:
        return
    own = spec.preprocessing()
    differing = [name for name in PREPROCESSING_FIELDS
                 if name in recorded and name in own and recorded[name] != own[name]]
    if differing:
        details = ", ".join(f"{name} {recorded[name]!r} (the encoder's: {own[name]!r})" for name in differing)
        raise ValueError(f"{owner}: trained on images prepared with {details}, which {spec.name} does not "
                         "do; the file is damaged or comes from another version of the encoder: use another "
                         "checkpoint")


def check_trained_cnn(encoder: Encoder, entry: Mapping[str, Any], owner: str) -> None:
    """Refuse a CNN that is not the one `owner` (a checkpoint, whose encoder entry is `entry`) was trained on."""
    check_same_cnn(encoder, entry, owner, "the loaded CNN is", "the checkpoint was trained on",
                   "its captions would be wrong; use the weights it was trained with")
