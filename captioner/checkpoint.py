"""Checkpoints: one safetensors file holding the tensors, with plain JSON in its header.

Tensors: the decoder's as `model.*`; a checkpoint whose CNN was fine-tuned also carries the CNN's as
`encoder.*` (its `encoder` entry's weights_hash is then that of those weights, as loaded in float32).
The header's metadata holds `format_version`, `config` (model config), `vocab` (the word list),
`encoder` (name, preprocessing, weights hash) and `info` (training settings, seed, data fingerprint,
val metrics, ...). Loading never unpickles anything: safetensors is a flat tensor format, and a file
that looks like a pickle or `torch.save` archive is refused before anything is parsed.
Writes go to a temporary file beside the target, then `os.replace`, so a crash mid-save leaves the
previous checkpoint intact.

A checkpoint is named by its file, or by a folder: one holding `model.safetensors` (an exported model) or
a training run's folder (its `best.safetensors`). `load_checkpoint` refuses a file whose weights are not
finite or whose config or encoder entry cannot be right, naming the file. Paths written into the info are
stored without the machine's folders (`portable_path`): a checkpoint says where it came from by a file's
folder and name, never by where that folder sat on the machine that made it.

`default_checkpoint_path` finds the checkpoint to use when none is named; `load_for_inference` gives a checkpoint together with the CNN
it was trained on (hash-checked), which is what every door that captions photos needs.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from captioner.config import ModelConfig, from_dict, to_dict
from captioner.encoders.registry import Encoder, checkpoint_encoder
from captioner.encoders.weights import NamedState
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary
from captioner.utils import atomic_replace

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
RUN_BEST_FILE = "best.safetensors"  # a training run's folder: the weights of its best epoch
SHIPPED_CHECKPOINT = "flickr8k-cocotext-lite0"
CHECKPOINT_ENV = "CAPTIONER_CHECKPOINT"
# Where the shipped checkpoint is: inside the installed package (a wheel, sdist or `pip install .`; setup.py
# copies it there), else in the checkpoints/ folder of the git checkout this package runs from (editable).
PACKAGED_CHECKPOINT = Path(__file__).resolve().parent / "_checkpoints" / SHIPPED_CHECKPOINT
REPOSITORY_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / SHIPPED_CHECKPOINT
# pickle's PROTO opcode with protocol 2..5; torch.save's zip archive
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    model: CaptionDecoder
    vocab: Vocabulary
    encoder: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    # The CNN's weights when the checkpoint carries its own (a fine-tuned CNN, tensors `encoder.*`);
    # None: the encoder entry's default weights (e.g. the packaged ImageNet ones), checked by weights_hash.
    encoder_state: dict[str, torch.Tensor] | None = None


def default_checkpoint_path() -> Path:
    """The checkpoint to use when none is named: $CAPTIONER_CHECKPOINT when set, else the shipped
    model, inside the installed package or in the git checkout's checkpoints/ folder, from any working
    directory. (A --checkpoint option, where a door has one, wins over both.)"""
    if os.environ.get(CHECKPOINT_ENV):
        return Path(os.environ[CHECKPOINT_ENV])
    for folder in (PACKAGED_CHECKPOINT, REPOSITORY_CHECKPOINT):
        if (folder / MODEL_FILE).is_file():
            return folder
    raise CheckpointError(f"the shipped checkpoint is not installed (looked in {PACKAGED_CHECKPOINT} and "
                          f"{REPOSITORY_CHECKPOINT}); reinstall captioner from a wheel, sdist or git checkout, "
                          f"or name one with --checkpoint or ${CHECKPOINT_ENV}")


def resolve(path: str | Path) -> Path:
    """The checkpoint file a name means: the file itself, or in a folder its `model.safetensors` (an
    exported model), else its `best.safetensors` (a training run's folder)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in (MODEL_FILE, RUN_BEST_FILE):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: a folder without {MODEL_FILE} or {RUN_BEST_FILE}; name a checkpoint file, a "
                          "folder holding one of those, or a training run's folder (the --out of `captioner train`)")


def portable_path(path: str | Path) -> str:
    """How a checkpoint records a file: its folder and name ("xe-run/best.safetensors"), without the folders
    above, which name places on one machine only."""
    parts = [part for part in re.split(r"[\\/]+", str(path)) if part not in ("", ".")]
    return "/".join(parts[-2:])


def checkpoint_label(path: str | Path | None) -> str | None:
    """How a run records the checkpoint it started from: the `portable_path` of the file `path` names."""
    return None if path is None else portable_path(resolve(path))


def is_machine_path(value: str) -> bool:
    """An absolute (or home-relative) path: one that names a place on the machine that wrote it."""
    return bool(re.match(r"(/|~|\\\\|[A-Za-z]:[\\/])", value)) and "\n" not in value and len(value) < 4096


def portable_info(value: Any) -> Any:
    """`value` (checkpoint info: JSON data) with every machine path replaced by its `portable_path`."""
    if isinstance(value, str):
        return portable_path(value) if is_machine_path(value) else value
    if isinstance(value, dict):
        return {key: portable_info(item) for key, item in value.items()}
    if isinstance(value, list):
        return [portable_info(item) for item in value]
    return value


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | Path) -> None:
    """Write a safetensors file through a temp file + rename, so readers never see half a file."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-save
        stale.unlink(missing_ok=True)
    with atomic_replace(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_checkpoint(path: str | Path, model: CaptionDecoder, vocab: Vocabulary, encoder: dict[str, Any],
                    info: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None,
                    extra_metadata: dict[str, Any] | None = None,
                    encoder_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a model checkpoint. `dtype=torch.float16` halves the file (weights are cast back on load).
    `encoder_state`: the CNN's own weights (a fine-tuned CNN), stored as `encoder.*`, also in `dtype`."""
    path = Path(path)
    path = path / MODEL_FILE if path.is_dir() else path

    def cast(value: torch.Tensor) -> torch.Tensor:
        return value.to(dtype) if dtype is not None and value.is_floating_point() else value

    tensors = {f"model.{k}": cast(v) for k, v in model.state_dict().items()}
    tensors.update({f"encoder.{k}": cast(v) for k, v in (encoder_state or {}).items()})
    tensors.update(extra_tensors or {})
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(to_dict(model.config)),
        "vocab": json.dumps(vocab.to_json(), ensure_ascii=False),
        "encoder": json.dumps(encoder),
        "info": json.dumps(portable_info(info or {})),
    }
    metadata.update({k: json.dumps(v) for k, v in (extra_metadata or {}).items()})
    atomic_save(tensors, metadata, path)
    return path


def read_raw(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, with specific errors for bad files."""
    path = resolve(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors: an 8-byte little-endian header size, then a JSON header starting with "{"
    looks_like_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not looks_like_safetensors and head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"{path}: this is a pickle / torch.save file, which captioner never loads "
                              "(unpickling can run arbitrary code); checkpoints must be safetensors files")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint, it may be truncated or "
                              f"corrupted ({error})") from error
    return tensors, metadata


def _json_field(path: Path, metadata: dict[str, str], key: str) -> Any:
    if key not in metadata:
        raise CheckpointError(f"{path}: checkpoint metadata has no {key!r} entry")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: checkpoint metadata {key!r} is not valid JSON ({error})") from error


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights (the decoder's `model.*`, a fine-tuned CNN's `encoder.*`) holding NaN or infinity:
    they caption every photo with nonsense, which nothing downstream would notice."""
    for name, tensor in tensors.items():
        if name.startswith(("model.", "encoder.")) and tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CheckpointError(f"{path}: {name} holds {bad} of {tensor.numel()} values that are NaN or "
                                      "infinite; the file is damaged or its training diverged: use another "
                                      "checkpoint (an earlier epoch, or retrain)")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _three_numbers(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


ENCODER_ENTRY_CHECKS = {  # field of an encoder entry (or of its preprocessing) -> (is it valid, what it must be)
    "encoder": (lambda v: isinstance(v, str) and bool(v), "an encoder name"),
    "weights_hash": (lambda v: v is None or (isinstance(v, str) and bool(v)), "a hash (a string)"),
    "feature_dim": (_positive_int, "a positive whole number"),
    "input_size": (_positive_int, "a positive whole number of pixels"),
    "resize_size": (lambda v: v is None or _positive_int(v), "a positive whole number of pixels"),
    "resize": (lambda v: v in ("squash", "shorter_side_crop"), "squash or shorter_side_crop"),
    "mean_0_255": (_three_numbers, "three numbers"),
    "std_0_255": (lambda v: _three_numbers(v) and all(x > 0 for x in v), "three positive numbers"),
}


def check_encoder_entry(path: Path, encoder: dict[str, Any], config: ModelConfig) -> None:
    """Refuse an encoder entry whose fields cannot be right (an input size of 0 or "big", a feature size
    other than the decoder's): the CNN it describes would be built or fed wrongly."""
    preprocessing = encoder.get("preprocessing", {})
    if not isinstance(preprocessing, dict):
        raise CheckpointError(f"{path}: encoder entry: 'preprocessing' must be a JSON object, found "
                              f"{preprocessing!r}; the file is damaged: use another checkpoint")
    for where, entry in (("encoder entry", encoder), ("encoder preprocessing", preprocessing)):
        for name, (valid, wanted) in ENCODER_ENTRY_CHECKS.items():
            if name in entry and not valid(entry[name]):
                raise CheckpointError(f"{path}: {where}: {name} must be {wanted}, found {entry[name]!r}; the file "
                                      "is damaged: use another checkpoint")
    if "feature_dim" in encoder and encoder["feature_dim"] != config.feature_dim:
        raise CheckpointError(f"{path}: the encoder entry gives {encoder['feature_dim']}-dim features but the "
                              f"decoder takes {config.feature_dim}; the file is damaged: use another checkpoint")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint for inference (eval mode, float32)."""
    path = resolve(path)
    tensors, metadata = read_raw(path)
    version = _json_field(path, metadata, "format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this captioner "
                              f"understands ({FORMAT_VERSION}); upgrade captioner to load it")
    try:
        config = from_dict(ModelConfig, _json_field(path, metadata, "config"))
        vocab = Vocabulary.from_json(_json_field(path, metadata, "vocab"))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: invalid config or vocabulary: {error}; the file is damaged: use another "
                              "checkpoint") from error
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{path}: the vocabulary has {len(vocab)} words but the config says "
                              f"vocab_size={config.vocab_size}")
    state = {k[len("model."):]: v.float() if v.is_floating_point() else v
             for k, v in tensors.items() if k.startswith("model.")}
    embedding = state.get("embed.weight")
    if embedding is not None and embedding.shape[0] != len(vocab):
        raise CheckpointError(f"{path}: the vocabulary has {len(vocab)} words but the embedding has "
                              f"{embedding.shape[0]} rows; vocabulary and weights do not belong together")
    check_finite(path, tensors)
    model = CaptionDecoder(config)
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model: missing {sorted(missing)}, "
                              f"unexpected {sorted(unexpected)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit the config: {error}") from error
    encoder = _json_field(path, metadata, "encoder")
    info = _json_field(path, metadata, "info")
    if not isinstance(encoder, dict) or not isinstance(info, dict):
        raise CheckpointError(f"{path}: 'encoder' and 'info' metadata must be JSON objects")
    check_encoder_entry(path, encoder, config)
    encoder_state = NamedState({k[len("encoder."):]: v.float() if v.is_floating_point() else v
                                for k, v in tensors.items() if k.startswith("encoder.")},
                               f"{path}: the fine-tuned CNN it carries (encoder.*)")
    return Checkpoint(model.to(device).eval(), vocab, encoder, info, path, encoder_state or None)


def load_for_inference(path: str | Path | None = None, device: str | torch.device = "cpu",
                       encoder_weights: str | Path | None = None) -> tuple[Checkpoint, Encoder]:
    """A checkpoint (default: the shipped one) and the CNN its encoder entry names, both on `device`.

    A checkpoint with a fine-tuned CNN carries its weights; others name the default ones by hash, and
    `encoder_weights` (a local file) replaces them, checked against that hash."""
    checkpoint = load_checkpoint(default_checkpoint_path() if path is None else path, device=device)
    encoder = checkpoint_encoder(checkpoint.encoder, str(checkpoint.path), checkpoint.encoder_state,
                                 weights=encoder_weights)
    encoder.to(device)
    return checkpoint, encoder
