"""A run folder and the training state in it, for every objective alike:

  last.safetensors   the whole training state (weights, optimizer, random state, weight average, history):
                     `--resume` reads it; it is also a checkpoint every command loads
  best.safetensors   the weights of the best epoch by val CIDEr-D: a usable checkpoint
  log.jsonl          one line per epoch (loss or reward, val scores, lr, seconds, throughput)
  curves.png         the training objective and the val scores per epoch

Every file is written to a temporary name and renamed, so a process killed at any moment (SIGKILL
included) leaves the previous whole file in place.

Nothing in a run folder is replaced unless asked (`check_run_folder`): a new run refuses a folder that
holds one (`--resume` continues it, `--overwrite` replaces it), and a resume refuses a folder whose
training state is gone, or whose settings are not the ones it was started with (each differing setting
named, with its two values).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from captioner import distributed
from captioner.checkpoint import RUN_BEST_FILE, CheckpointError, portable_path, read_raw
from captioner.config import from_dict
from captioner.utils import atomic_replace, check_output_folder, write_text_atomic

LAST, BEST, LOG, CURVES = "last.safetensors", RUN_BEST_FILE, "log.jsonl", "curves.png"
RUN_FILES = (LAST, BEST, LOG, CURVES)


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names the folder and the flag to use."""


# ------------------------------------------------------------------------------------- run folder
def run_files(out_dir: Path) -> list[str]:
    """The run files (`RUN_FILES`) in `out_dir`."""
    return [name for name in RUN_FILES if (out_dir / name).exists()] if out_dir.is_dir() else []


def check_run_folder(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse what would lose a run: starting a new one over a folder that holds one (unless `overwrite`),
    or resuming (`resume`) one whose training state, last.safetensors, is gone. An empty or missing folder
    starts a new run either way."""
    out_dir = Path(out_dir)
    check_output_folder(out_dir, resume, overwrite, "run", RunFolderError)
    found = run_files(out_dir)
    if resume and found and LAST not in found:
        raise RunFolderError(f"{out_dir}: nothing to resume from: {LAST}, the run's training state, is missing "
                             f"(the folder holds {', '.join(found)}); start the run again with --overwrite, which "
                             "replaces them, or give another --out")
    if not resume and found and not overwrite:
        raise RunFolderError(f"{out_dir}: holds a training run ({', '.join(found)}); continue it with --resume, "
                             "replace it with --overwrite, or give another --out")


def clear_run_folder(out_dir: str | Path) -> list[str]:
    """Remove a run's files from `out_dir` (`--overwrite`), with the temporary files of interrupted writes;
    anything else in the folder stays. Returns the names removed."""
    out_dir = Path(out_dir)
    removed = run_files(out_dir)
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
        for stale in out_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    return removed


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
def setting_differences(name: str, saved: Any, current: Any) -> list[tuple[str, Any, Any]]:
    """(setting, value in the run, value now) for each setting that differs; a settings dataclass is compared
    field by field (named by field, nested ones as `val_decode.beam_size`), a field added since the run was
    saved counting as its default."""
    if dataclasses.is_dataclass(current):
        try:
            saved = from_dict(type(current), saved) if isinstance(saved, dict) else saved
        except (TypeError, ValueError):
            return [(name, "unreadable", "set")]
        if type(saved) is not type(current):
            return [(name, saved, "set")]
        differences = []
        for field in dataclasses.fields(current):
            inner = f"{name}.{field.name}" if name and not name.endswith("_config") else field.name
            differences += setting_differences(inner, getattr(saved, field.name), getattr(current, field.name))
        return differences
    return [] if saved == current else [(name, saved, current)]


def same_init(saved: Any, current: Any) -> bool:
    """The init checkpoint of a run: recorded by folder and name (`portable_path`); runs saved before that
    recorded the path as given, which names the same file when its folder and name match."""
    if saved is None or current is None:
        return saved is current
    return saved == current or portable_path(saved) == current or (
        Path(saved).is_dir() and portable_path(Path(saved) / "model.safetensors") == current)


def describe_differences(differences: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{name} {json.dumps(saved)} in the run, {json.dumps(current)} now"
                     for name, saved, current in differences)


def read_training_state(path: Path, settings: dict[str, Any], model_config: dict[str, Any],
                        epochs_fixed: str | None = None,
                        data_fingerprint: str | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the training state of a run folder's last.safetensors, after checking that it was
    written by a run with these `settings` (info entries), this decoder config and (when both record one)
    this data fingerprint. `epochs` may differ (a run continued to more epochs, or ended sooner) unless
    `epochs_fixed` gives the reason it may not, and never below the epochs the run has trained."""
    tensors, metadata = read_raw(path)
    state = json.loads(metadata.get("training_state", "null") or "null")
    if not isinstance(state, dict) or "epoch" not in state or "history" not in state:
        raise CheckpointError(f"{path}: not a training-state checkpoint (no 'training_state'); start the run again "
                              "with --overwrite, or give another --out")
    saved = json.loads(metadata.get("info", "{}") or "{}")
    kind = next(iter(settings))
    if kind not in saved:
        raise CheckpointError(f"{path}: written by another kind of run (no {kind!r} in its info); resume it "
                              "with the --objective that started it, or give another --out")
    differences: list[tuple[str, Any, Any]] = []
    for name, value in settings.items():
        if name == "init_checkpoint":
            if not same_init(saved.get(name), value):
                differences.append((name, saved.get(name), value))
        else:
            differences += setting_differences(name, saved.get(name), value)
    saved_model = json.loads(metadata.get("config", "null"))
    if saved_model != model_config:
        keys = list(model_config) + [key for key in (saved_model or {}) if key not in model_config]
        differences += [(key, (saved_model or {}).get(key), model_config.get(key)) for key in keys
                        if (saved_model or {}).get(key) != model_config.get(key)]
    recorded = saved.get("data_fingerprint")
    if recorded and data_fingerprint and recorded != data_fingerprint:
        differences.append(("data_fingerprint (the training data)", recorded, data_fingerprint))
    # Epochs may change where the objective allows it (e.g. a constant learning rate): the run continued to
    # more epochs is what an uninterrupted run of that many does.
    epochs = [d for d in differences if d[0] == "epochs"]
    others = [d for d in differences if d[0] != "epochs"]
    problems = []
    if others:
        problems.append(f"the run was started with other settings ({describe_differences(others)}); resume it with "
                        "the run's settings, or start again with --overwrite (or give another --out)")
    if epochs and epochs_fixed is not None:
        _, saved_epochs, wanted = epochs[0]
        problems.append(f"the run was started for {saved_epochs} epochs, not {wanted}, and its epochs cannot change on "
                        f"resume: {epochs_fixed}; to train {wanted} epochs start again with --overwrite, or train on "
                        f"from its best with --init-from {path.parent / BEST} and another --out")
    elif epochs and epochs[0][2] < state["epoch"]:
        problems.append(f"the run has trained {state['epoch']} epochs already, more than --epochs {epochs[0][2]}; "
                        f"give --epochs {state['epoch']} or more")
    if problems:
        raise CheckpointError(f"{path}: " + ". ".join(problems))
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
