"""The one training loop. Every way of training captioner (teacher forcing on cached features, SCST, CNN
fine-tuning) is an `Objective` run by `Trainer`: the objective says what differs (what it builds from the
start, the batches, the loss, which parameters train, how val features are made); the trainer owns what
they share (where the run starts: loading the `init_from` checkpoint; the run folder and resume, best/last
checkpoints, log.jsonl, curves.png, the seeded epoch order, early stopping, the weight average, mixed
precision, DistributedDataParallel).

The data order of epoch e depends only on (seed, e) and the random state is saved with every
checkpoint, so a run interrupted after epoch k and resumed ends with the same weights as an
uninterrupted run.

Under torchrun (objectives that support it) the model is wrapped in DistributedDataParallel: every rank
draws the same epoch order and the objective takes this rank's share of each batch. Only rank 0 writes
files; val decoding is split over the ranks and scored on rank 0, and every rank gets the scores, so all
agree on best and stopping.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from captioner import distributed
from captioner.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from captioner.config import to_dict
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary
from captioner.train.data import epoch_order
from captioner.train.schedule import WeightAverage
from captioner.train.state import (
    BEST,
    CURVES,
    LAST,
    LOG,
    check_run_folder,
    clear_run_folder,
    optimizer_tensors,
    plot_curves,
    rank_seed,
    read_training_state,
    restore_optimizer,
    restore_rng,
    rng_state,
    rng_tensors,
    strip_prefix,
    write_log,
)
from captioner.utils import progress_bar


def autocast_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for `--amp` on `device`; None for full float32."""
    if amp in (None, "", "none", "off"):
        return None
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"--amp {amp}: use bf16 or fp16")
    if device.type == "cuda":
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                             "use --amp fp16")
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if amp == "fp16":
        raise ValueError(f"--amp fp16 needs a CUDA device (this run is on {device}); on the CPU train in "
                         "float32 (no --amp) or with --amp bf16")
    if not cpu_bf16_lstm_supported():
        raise ValueError("--amp bf16: this CPU's oneDNN cannot run an LSTM in bfloat16 (it needs AVX-512 "
                         "or newer); train in float32 (no --amp)")
    return torch.bfloat16  # CPU autocast works, but is only faster on CPUs with bfloat16 units


@functools.cache
def cpu_bf16_lstm_supported() -> bool:
    """Whether a bfloat16-autocast LSTM runs on this CPU: oneDNN has no bf16 LSTM kernel for AVX2-only
    CPUs and raises at the first forward, so ask once with a one-step toy LSTM."""
    lstm = torch.nn.LSTM(2, 2, batch_first=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(1, 1, 2))
    except RuntimeError:
        return False
    return True


class Objective:
    """What one way of training brings to the loop. Subclasses set `config` (a settings dataclass with
    epochs, patience, seed, grad_clip, weight_decay and val_decode) and `init_from` (the trained checkpoint
    the run starts from, as the user named it; None: a new decoder) in __init__, and build `model` and
    `vocab` in `prepare`, which the trainer calls after seeding torch with that checkpoint loaded."""

    name = "training"
    label = ""  # before "epoch N" in the progress lines
    supports_ddp = False  # can run data-parallel under torchrun
    supports_amp = False  # its forward passes run under the trainer's autocast
    validates_start = False  # validate the starting model as epoch 0, which competes for best
    curve = ("train_loss", "training loss (teacher forced)", "cross-entropy")  # log key, title, y label

    # Why the number of epochs cannot change when the run is resumed (None: it may, e.g. with a constant
    # learning rate, and a run resumed with more epochs ends as an uninterrupted run of that many would).
    epochs_fixed: str | None = None
    data_name: str | None = None  # what the run trains on, as the checkpoints record it ("data")

    config: Any
    init_from: str | None = None
    model: CaptionDecoder
    vocab: Vocabulary

    def prepare(self, device: torch.device, amp: str | None, initial: Checkpoint | None) -> None:
        """Build the decoder (and whatever else trains) on `device`, from `initial` (the `init_from`
        checkpoint, loaded on the CPU) when the run starts from one."""
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: what trains, at which base rate."""
        return [{"params": list(self.model.parameters()), "lr": self.config.lr}]

    def settings(self) -> dict[str, Any]:
        """Entries of the checkpoint info a resumed run must match; the first one names the kind of run."""
        raise NotImplementedError

    def run_info(self) -> dict[str, Any]:
        """The checkpoint info (settings, seed, data) written with every checkpoint."""
        raise NotImplementedError

    def encoder(self) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
        """The checkpoints' encoder entry (which CNN, its weights hash), and the CNN weights they carry
        (`encoder.*`), or None for the entry's default weights."""
        return {}, None

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        """Restore what trains besides the decoder from a last.safetensors' tensors."""

    @property
    def examples(self) -> int:
        """How many examples an epoch orders (captions, or images)."""
        raise NotImplementedError

    @property
    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def learning_rates(self, step: int, total_steps: int) -> list[float]:
        """Each parameter group's learning rate at `step`; constant by default."""
        return [group["lr"] for group in self.param_groups()]

    def start_epoch(self) -> None:
        """Set train/eval modes and reset the epoch's statistics."""
        self.model.train()

    def batches(self, order: Tensor) -> Iterator[Any]:
        """The epoch's batches in `order` (None for a step with nothing to train on)."""
        raise NotImplementedError

    def loss(self, batch: Any, module: torch.nn.Module, autocast: Callable[[], Any]) -> Tensor:
        """The loss to back-propagate for one batch (run the decoder through `module`, which is the DDP
        wrapper under torchrun, and inside `autocast()`); record the batch's statistics."""
        raise NotImplementedError

    def epoch_stats(self, train_seconds: float) -> dict[str, Any]:
        """The epoch's log fields (summed over ranks): its loss or reward, throughput."""
        raise NotImplementedError

    def start_entry(self) -> dict[str, Any]:
        """Log fields of epoch 0 (the starting model, validated only) besides its val scores."""
        return {}

    def summary(self, entry: dict[str, Any]) -> str:
        """The epoch's training figure for the progress line."""
        return f"loss {entry['train_loss']:.3f}"

    def postfix(self) -> dict[str, str]:
        """The progress bar's running figure."""
        return {}

    def describe(self) -> str:
        """One line on what is about to train."""
        return f"{self.name}: {self.steps_per_epoch} steps per epoch"

    def validate(self, model: CaptionDecoder) -> dict[str, float]:
        """Val BLEU-4 and CIDEr-D of `model` (the decoder, or its weight average) by real decoding."""
        raise NotImplementedError


class Trainer:
    """Runs an Objective in a run folder (see captioner.train.state for the files) and returns the path of
    best.safetensors, which always exists when the run ends normally.

    `resume`: continue the run in `out_dir` from its last.safetensors (refused if it was started with
    other settings, or if its training state is gone); `overwrite`: replace the run `out_dir` holds. With
    neither, a folder holding a run is refused (`state.check_run_folder`). `ema_decay` > 0: validate, select and save an exponential moving average of the
    decoder's weights (the raw weights are scored too, as `val_raw`). `amp`: None, "bf16" or "fp16"
    (`autocast_dtype`). `on_epoch_end(entry)` is called after each epoch's files are written (tests stop
    runs with it).
    """

    def __init__(self, objective: Objective, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                 device: str | torch.device = "cpu", amp: str | None = None, ema_decay: float = 0.0,
                 progress: bool = True, on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.objective, self.out_dir, self.resume, self.overwrite = objective, Path(out_dir), resume, overwrite
        self.device = torch.device(device)
        self.amp, self.ema_decay, self.progress, self.on_epoch_end = amp, ema_decay, progress, on_epoch_end
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if not objective.supports_ddp and (self.world > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            raise ValueError(f"{objective.name} runs in one process; start it without torchrun")
        if amp not in (None, "", "none", "off") and not objective.supports_amp:
            raise ValueError(f"--amp: {objective.name} runs in float32; leave out --amp")
        self.amp_dtype = autocast_dtype(amp, self.device)
        self.history: list[dict[str, Any]] = []
        self.best_cider, self.bad_epochs, self.start_epoch = -1.0, 0, 1

    def autocast(self) -> Any:
        """The forward pass's mixed-precision context (a no-op without --amp)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def run(self) -> Path:
        objective, config = self.objective, self.objective.config
        check_run_folder(self.out_dir, self.resume, self.overwrite)  # every rank: all refuse together
        distributed.barrier()  # every rank has looked before rank 0 clears anything
        if distributed.is_main():
            if self.overwrite and (removed := clear_run_folder(self.out_dir)):
                distributed.print0(f"--overwrite: removed the previous run's {', '.join(removed)} from {self.out_dir}")
            self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        initial = load_checkpoint(objective.init_from) if objective.init_from is not None else None
        objective.prepare(self.device, self.amp, initial)
        model = objective.model
        self.average = WeightAverage(model, self.ema_decay) if self.ema_decay else None
        if self.rank > 0:  # same initial weights everywhere, but each rank its own dropout masks
            torch.manual_seed(rank_seed(config.seed, self.rank))
        self.optimizer = torch.optim.AdamW(objective.param_groups(), weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.trained = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._resume()
        # The forward must go through the wrapper: that is what arms DDP's gradient all-reduce for the step.
        # Every parameter gets a gradient each step, so DDP needs no find_unused_parameters.
        self.module: torch.nn.Module = model
        if self.world > 1:
            self.module = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == "cuda" else None)

        if objective.validates_start and not self.history:  # epoch 0: the score training has to beat
            val_start = time.perf_counter()
            val_scores, raw_scores = self._validate()
            entry = {"epoch": 0, **objective.start_entry(), "val": val_scores,
                     "val_seconds": round(time.perf_counter() - val_start, 2)}
            self._finish_epoch(entry, raw_scores)
        distributed.print0(objective.describe())
        if self.start_epoch > config.epochs:
            distributed.print0(f"the run has trained its {config.epochs} epochs; nothing left to do")
        for epoch in range(self.start_epoch, config.epochs + 1):
            if self.bad_epochs >= config.patience:
                distributed.print0(f"stopping: val CIDEr-D has not improved for {self.bad_epochs} epochs")
                break
            self._train_epoch(epoch)
        return self.out_dir / BEST

    def _resume(self) -> None:
        objective, last = self.objective, self.out_dir / LAST
        found = distributed.all_gather_object(self.resume and last.exists())
        if len(set(found)) > 1:
            missing = [k for k, seen in enumerate(found) if not seen]
            raise CheckpointError(f"{last}: rank(s) {missing} cannot see it; with several machines, --out "
                                  "must be a folder that every machine shares")
        if not found[0]:
            if self.resume:
                distributed.print0(f"nothing to resume in {self.out_dir}: starting a new run")
            return
        tensors, state = read_training_state(last, objective.settings(), to_dict(objective.model.config),
                                             objective.epochs_fixed, objective.run_info().get("data_fingerprint"))
        best_entry = max(state["history"], key=lambda entry: entry["val"]["CIDEr-D"], default=None)
        # rank 0 reads the files; every rank learns what it found, so all go on or stop together
        problem = distributed.all_gather_object(self._best_problem(best_entry) if distributed.is_main() else None)[0]
        if problem is not None and best_entry["epoch"] == 0 and objective.validates_start:
            # The starting model, which the objective has just built, before the saved state is loaded (an
            # older `captioner finetune` did not write it as best).
            if distributed.is_main():
                self._save(BEST, objective.model, best_entry)
            problem = None
        objective.model.load_state_dict(strip_prefix(tensors, "model."))
        objective.load_state(tensors)
        restore_optimizer(self.optimizer, tensors)
        if self.average is not None:
            if "ema_updates" not in state or state["ema_updates"] is None:
                raise CheckpointError(f"{last}: the run kept no weight average; resume it without --ema-decay")
            self.average.load(tensors, state["ema_updates"])
        self.history, self.best_cider = state["history"], state["best_cider"]
        self.bad_epochs, self.start_epoch = state.get("bad_epochs", 0), state["epoch"] + 1
        if problem is not None:
            if best_entry["epoch"] != state["epoch"]:
                raise CheckpointError(f"{self.out_dir / BEST}: {problem}; the weights of the run's best epoch "
                                      f"({best_entry['epoch']}, val CIDEr-D {best_entry['val']['CIDEr-D'] * 100:.1f}) "
                                      f"are lost ({LAST} holds epoch {state['epoch']}): start the run again with "
                                      f"--overwrite, or use {self.out_dir / LAST} as the checkpoint")
            if distributed.is_main():  # the best epoch is the last one saved: its weights are in last.safetensors
                self._save(BEST, self.average.model if self.average is not None else objective.model, best_entry)
                distributed.print0(f"{self.out_dir / BEST}: {problem}; written again from {LAST}, which holds the "
                                   f"same epoch ({best_entry['epoch']})")
        if state.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        restored = distributed.all_gather_object(restore_rng(tensors, self.device, objective.config.seed,
                                                             state["epoch"]))
        distributed.print0(f"resuming {self.out_dir} after epoch {state['epoch']} "
                           f"(best val CIDEr-D {self.best_cider:.4f})")
        if not all(restored):
            distributed.print0("note: the run was saved by fewer processes; the dropout random state of the new "
                               "ranks is reseeded, so the result differs slightly from an uninterrupted run")

    def _best_problem(self, best_entry: dict[str, Any] | None) -> str | None:
        """What is wrong with the run folder's best.safetensors (missing, unreadable, another epoch's), or None."""
        if best_entry is None:
            return None
        path = self.out_dir / BEST
        if not path.is_file():
            return "missing"
        try:
            epoch = load_checkpoint(path).info.get("epoch")
        except CheckpointError as error:
            return f"unreadable ({str(error).removeprefix(f'{path}: ')})"
        if epoch is not None and epoch != best_entry["epoch"]:
            return f"holds epoch {epoch}, but the run's best is epoch {best_entry['epoch']}"
        return None

    def _train_epoch(self, epoch: int) -> None:
        objective, config = self.objective, self.objective.config
        steps_per_epoch = objective.steps_per_epoch
        total_steps = steps_per_epoch * config.epochs
        objective.start_epoch()
        epoch_start = time.perf_counter()
        lrs: list[float] = [group["lr"] for group in self.optimizer.param_groups]
        batches = objective.batches(epoch_order(objective.examples, config.seed, epoch))
        bar = progress_bar(batches, desc=f"{objective.label}epoch {epoch}", total=steps_per_epoch,
                           enabled=self.progress and self.rank == 0)
        for step_in_epoch, batch in enumerate(bar):
            if batch is None:
                continue
            lrs = objective.learning_rates((epoch - 1) * steps_per_epoch + step_in_epoch, total_steps)
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            loss = objective.loss(batch, self.module, self.autocast)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trained, config.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.average is not None:
                self.average.update(objective.model)
            if self.progress and self.rank == 0 and step_in_epoch % 20 == 0:
                bar.set_postfix(objective.postfix())
        train_seconds = time.perf_counter() - epoch_start
        stats = objective.epoch_stats(train_seconds)
        val_start = time.perf_counter()
        val_scores, raw_scores = self._validate()
        entry = {"epoch": epoch, **stats, "lr": lrs[0] if len(lrs) == 1 else lrs, "val": val_scores,
                 "train_seconds": round(train_seconds, 2), "val_seconds": round(time.perf_counter() - val_start, 2),}
        self._finish_epoch(entry, raw_scores)

    def _validate(self) -> tuple[dict[str, float], dict[str, float] | None]:
        """Val scores of what is selected and saved (the weight average, if kept), and of the raw weights
        when they differ from it, to see what the average brings."""
        if self.average is None:
            return self.objective.validate(self.objective.model), None
        return self.objective.validate(self.average.model), self.objective.validate(self.objective.model)

    def _save(self, name: str, model: CaptionDecoder, entry: dict[str, Any], **extra: Any) -> None:
        """Write `model` as the run folder's `name`, with the checkpoint info of epoch `entry`."""
        objective = self.objective
        info = {**objective.run_info(), **({"data": objective.data_name} if objective.data_name else {}),
                "epoch": entry["epoch"], "val_metrics": entry["val"], "val_decode": to_dict(objective.config.val_decode)}
        encoder, encoder_state = objective.encoder()
        save_checkpoint(self.out_dir / name, model, objective.vocab, encoder, info, encoder_state=encoder_state,
                        **extra)

    def _finish_epoch(self, entry: dict[str, Any], raw_scores: dict[str, float] | None) -> None:
        """Select, log, print and save one epoch; every file is on disk before any rank goes on."""
        objective, epoch = self.objective, entry["epoch"]
        if raw_scores is not None:
            entry["val_raw"] = raw_scores
        self.history.append(entry)
        improved = entry["val"]["CIDEr-D"] > self.best_cider
        self.best_cider, self.bad_epochs = ((entry["val"]["CIDEr-D"], 0) if improved
                                            else (self.best_cider, self.bad_epochs + 1))
        entry["best"] = improved
        val = entry["val"]
        line = (f"{objective.label}epoch {epoch}: "
                + (objective.summary(entry) + "  " if epoch else "(start)  ")
                + f"val BLEU-4 {val['BLEU-4'] * 100:.1f}  CIDEr-D {val['CIDEr-D'] * 100:.1f}"
                + ("  (best)" if improved else "") + "  "
                + (f"(raw weights {raw_scores['BLEU-4'] * 100:.1f} / {raw_scores['CIDEr-D'] * 100:.1f})  "
                   if raw_scores is not None else "")
                + (f"{entry['train_seconds']:.0f}s train, " if "train_seconds" in entry else "")
                + f"{entry['val_seconds']:.0f}s val")
        distributed.print0(line)
        rng_states = distributed.all_gather_object(rng_state(self.device))
        if distributed.is_main():
            if improved:
                self._save(BEST, self.average.model if self.average is not None else objective.model, entry)
            training_state = {"epoch": epoch, "history": self.history, "best_cider": self.best_cider,
                              "bad_epochs": self.bad_epochs,
                              "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                              "ema_updates": self.average.updates if self.average is not None else None}
            self._save(LAST, objective.model, entry,
                       extra_tensors={**optimizer_tensors(self.optimizer), **rng_tensors(rng_states),
                                      **(self.average.tensors() if self.average is not None else {})},
                       extra_metadata={"training_state": training_state})
            write_log(self.out_dir / LOG, self.history)
            plot_curves(self.history, self.out_dir / CURVES, *objective.curve)
        distributed.barrier()  # the checkpoint is on disk before any rank goes on (or is stopped)
        if self.on_epoch_end is not None:
            self.on_epoch_end(entry)
