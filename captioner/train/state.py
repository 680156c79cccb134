"""A run folder and the training state in it, for every objective alike:

  last.safetensors   the whole training state (weights, optimizer, random state, weight average, history):
                     `--resume` reads it; it is also a checkpoint every command loads
  best.safetensors   the weights of the best epoch by val CIDEr-D: a usable checkpoint
  log.jsonl          one line per epoch (loss or reward, val scores, lr, seconds, throughput)
  curves.png         the training objective and the val scores per epoch

Every file is written to a temporary name and renamed, so a process killed at any moment (SIGKILL
included) leaves the previous whole file in place.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from captioner import distributed
from captioner.checkpoint import CheckpointError, read_raw
from captioner.config import from_dict
from captioner.utils import atomic_replace, write_text_atomic

LAST, BEST, LOG, CURVES = "last.safetensors", "best.safetensors", "log.jsonl", "curves.png"


def strip_prefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors whose names start with `prefix` ("model.", "encoder.", "ema."), named without it."""
    return {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}


# --------------------------------------------------------------------------------------- optimizer
def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The optimizer's per-parameter state as flat tensors `optim.<index>.<name>`."""
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value)
    return tensors


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    """Load `optim.*` tensors back; the parameter groups (learning rates, ...) stay as built."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


# ------------------------------------------------------------------------------------ random state
def rank_seed(seed: int, rank: int) -> int:
    """Dropout seed of rank > 0 (rank 0 keeps the single-process random stream)."""
    return (seed * 1_000_003 + rank * 7_919) % (2**63)


def rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rng_tensors(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Every rank's random state: rank 0's CPU state as `rng.torch` (as single-process runs save it)."""
    tensors = {}
    for rank, state in enumerate(states):
        tensors["rng.torch" if rank == 0 else f"rng.torch.rank{rank}"] = state["cpu"]
        if "cuda" in state:
            tensors[f"rng.cuda.rank{rank}"] = state["cuda"]
    return tensors


def restore_rng(tensors: dict[str, Tensor], device: torch.device, seed: int, epoch: int) -> bool:
    """Restore this rank's saved random state; False when the run was saved by fewer processes, in which
    case this rank is reseeded from (seed, epoch, rank)."""
    rank = distributed.rank()
    cpu = tensors.get("rng.torch" if rank == 0 else f"rng.torch.rank{rank}")
    if cpu is None:
        torch.manual_seed(rank_seed(seed + epoch, rank))
        return False
    torch.set_rng_state(cpu)
    if device.type == "cuda" and f"rng.cuda.rank{rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"], device)
    return True


# ----------------------------------------------------------------------------------------- resume
def same_setting(saved: Any, current: Any) -> bool:
    """Whether a setting saved in a run's info equals the current one. Settings dataclasses are compared
    as dataclasses, so a field added since the run was saved counts as its default."""
    if dataclasses.is_dataclass(current) and isinstance(saved, dict):
        try:
            return from_dict(type(current), saved) == current
        except (TypeError, ValueError):
            return False
    return saved == current


def read_training_state(path: Path, settings: dict[str, Any],
                        model_config: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the training state of a run folder's last.safetensors, after checking that it was
    written by a run with these `settings` (info entries) and this decoder config."""
    tensors, metadata = read_raw(path)
    state = json.loads(metadata.get("training_state", "null") or "null")
    if not isinstance(state, dict) or "epoch" not in state or "history" not in state:
        raise CheckpointError(f"{path}: not a training-state checkpoint (no 'training_state'); use a new --out "
                              "folder")
    saved = json.loads(metadata.get("info", "{}") or "{}")
    kind = next(iter(settings))
    if kind not in saved:
        raise CheckpointError(f"{path}: written by another kind of run (no {kind!r} in its info); resume it "
                              "with the command that started it, or use a new --out folder")
    differing = [name for name, value in settings.items() if not same_setting(saved.get(name), value)]
    if json.loads(metadata.get("config", "null")) != model_config:
        differing.append("model config")
    if differing:
        raise CheckpointError(f"{path}: the run was started with other settings ({', '.join(differing)} "
                              "differ); resume it with the same settings, or use a new --out folder")
    return tensors, state


# ------------------------------------------------------------------------------------ log, curves
def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(entry) + "\n" for entry in history))


def plot_curves(history: list[dict[str, Any]], path: Path, left_key: str = "train_loss",
                left_title: str = "training loss (teacher forced)", left_label: str = "cross-entropy") -> None:
    """`left_key` per epoch on the left (epochs without it are skipped), val scores on the right."""
    import matplotlib  # only here: it is slow to import, and only rank 0 of a training run draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [h for h in history if h.get(left_key) is not None]
    epochs = [h["epoch"] for h in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([h["epoch"] for h in trained], [h[left_key] for h in trained], marker="o")
    left.set(title=left_title, xlabel="epoch", ylabel=left_label)
    right.plot(epochs, [h["val"]["CIDEr-D"] for h in history], marker="o", label="val CIDEr-D")
    right.plot(epochs, [h["val"]["BLEU-4"] for h in history], marker="s", label="val BLEU-4")
    right.set(title="validation (real decoding)", xlabel="epoch")
    right.legend()
    figure.tight_layout()
    with atomic_replace(path) as tmp:
        figure.savefig(tmp, dpi=90, format="png")
    plt.close(figure)
