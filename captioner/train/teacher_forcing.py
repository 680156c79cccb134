"""Teacher forcing: a new decoder trained with cross-entropy on cached image features (`captioner train`).

Under torchrun `batch_size` is the GLOBAL batch: rank r of W trains on captions r, r+W, r+2W, ... of each
global batch. Each rank's loss is its sum over tokens divided by the global batch's token count (times
W, because DDP averages gradients over ranks), so the update, the learning rate and the logged loss mean
what they mean in one process with the same batch size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from captioner import distributed
from captioner.checkpoint import Checkpoint, checkpoint_label, portable_path
from captioner.config import ModelConfig, TrainConfig, to_dict
from captioner.data.records import CaptionRecord
from captioner.evaluation.validate import validate
from captioner.model import CaptionDecoder, count_parameters
from captioner.text import Vocabulary, tokenize
from captioner.train.data import cached_splits, encode_split
from captioner.train.schedule import learning_rate
from captioner.train.text_corpus import corpus_fingerprint, text_corpus_examples
from captioner.train.trainer import Objective, Trainer, autocast_dtype
from captioner.train.warm_start import check_features_encoder, warm_start

EPOCHS_FIXED = ("its learning rate follows one warm-up and cosine decay over all the run's epochs, so a run "
                "continued to other epochs would not be the run of that many epochs")


class TeacherForcing(Objective):
    """Cross-entropy of every caption's next token given the true previous ones; init: a new decoder, or
    (`init_checkpoint`) a trained one, grown to this run's vocabulary (`captioner.train.warm_start`)."""

    name = "cross-entropy training"
    supports_ddp = supports_amp = True
    epochs_fixed = EPOCHS_FIXED

    def __init__(self, train_records: list[CaptionRecord], train_features: Tensor, val_records: list[CaptionRecord],
                 val_features: Tensor, config: TrainConfig, model: ModelConfig | None = None,
                 encoder: dict[str, Any] | None = None, data_fingerprint: str | None = None,
                 init_checkpoint: str | Path | None = None) -> None:
        self.config, self.shape, self.encoder_description = config, model, encoder or {}
        self.init_from = None if init_checkpoint is None else str(init_checkpoint)
        self.initial: Checkpoint | None = None
        if model is not None and not isinstance(model, ModelConfig):
            raise TypeError(f"model: the decoder's shape as a ModelConfig, not a {type(model).__name__}")
        if model is not None and init_checkpoint is not None:
            raise ValueError("a warm-started decoder keeps the shape of its initial checkpoint; do not give "
                             "decoder shape options")
        self.train_records, self.train_features = train_records, train_features
        limit = config.val_max_images or len(val_records)
        self.val_records, self.val_features = val_records[:limit], val_features[:limit]
        self.data_fingerprint = data_fingerprint
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if config.batch_size < self.world:
            raise ValueError(f"--batch-size {config.batch_size} is the global batch, shared by {self.world} "
                             f"processes: give at least {self.world}")

    def prepare(self, device: torch.device, amp: str | None, initial: Checkpoint | None) -> None:
        config = self.config
        self.device, self.amp, self.amp_dtype = device, amp, autocast_dtype(amp, device)
        self.vocab = Vocabulary.build((tokenize(c) for r in self.train_records for c in r.captions),
                                      config.min_word_count)
        if initial is None:
            self.model = CaptionDecoder(replace(self.shape or ModelConfig(), vocab_size=len(self.vocab),
                                                feature_dim=self.train_features.size(1)))
        else:
            self.model = self.warm_started(initial)
        self.model.to(device)
        self.data = encode_split(self.train_records, self.train_features.float(), self.vocab,
                                 config.max_caption_length)

    def warm_started(self, initial: Checkpoint) -> CaptionDecoder:
        """A decoder of the initial checkpoint's shape with this run's vocabulary, its weights copied."""
        self.initial = initial
        check_features_encoder(initial, self.encoder_description, self.train_features.size(1))
        model = CaptionDecoder(replace(initial.model.config, vocab_size=len(self.vocab)))
        kept = warm_start(model, self.vocab, initial.model, initial.vocab)
        distributed.print0(f"warm start from {initial.path}: {kept} of {len(self.vocab)} words keep their "
                           f"trained rows; {len(self.vocab) - kept} are new")
        return model

    @property
    def examples(self) -> int:
        return len(self.data.lengths)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.examples / self.config.batch_size)

    def settings(self) -> dict[str, Any]:
        # None when training a new decoder: runs saved before warm starts existed have no such entry
        return {"train_config": self.config, "init_checkpoint": checkpoint_label(self.init_from)}

    def run_info(self) -> dict[str, Any]:
        initial = {} if self.initial is None else {"init_checkpoint": checkpoint_label(self.init_from),
                                                   "init_info": self.initial.info}
        return {**initial, "train_config": to_dict(self.config), "seed": self.config.seed,
                "data_fingerprint": self.data_fingerprint, "train_images": len(self.train_records),
                "train_captions": self.examples, "parameters": count_parameters(self.model),
                "world_size": self.world, "device": self.device.type, "amp": self.amp}

    def encoder(self) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
        if self.initial is not None:  # the initial checkpoint's own CNN (checked against the cache), passed on
            return self.initial.encoder, self.initial.encoder_state
        return self.encoder_description, None

    def learning_rates(self, step: int, total_steps: int) -> list[float]:
        return [learning_rate(step, total_steps, self.config)]

    def start_epoch(self) -> None:
        self.model.train()
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # this rank's token losses
        self.token_count, self.data_seconds = 0, 0.0

    def batches(self, order: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor, float]]:
        """(features, tokens, lengths, loss weight) of this rank's share of each global batch."""
        batch_size, world, rank = self.config.batch_size, self.world, self.rank
        for step in range(self.steps_per_epoch):
            fetch_start = time.perf_counter()
            global_batch = order[step * batch_size:(step + 1) * batch_size]
            global_tokens = int((self.data.lengths[global_batch] - 1).sum())
            local_batch = global_batch[rank::world]
            # loss = (this rank's token-loss sum) * W / global tokens; DDP's mean over ranks makes it sum/tokens
            weight = world / global_tokens
            if len(local_batch) == 0:  # a last batch smaller than W: still take part in the all-reduce
                local_batch, weight = global_batch[:1], 0.0
            features, tokens, lengths = self.data.batch(local_batch)
            features = features.to(self.device, non_blocking=True)
            tokens = tokens.to(self.device, non_blocking=True)
            self.data_seconds += time.perf_counter() - fetch_start
            yield features, tokens, lengths, weight

    def loss(self, batch: tuple[Tensor, Tensor, Tensor, float], module: torch.nn.Module,
             autocast: Callable[[], Any]) -> Tensor:
        features, tokens, lengths, weight = batch
        with autocast():
            logits, targets = module(features, tokens, lengths)
        token_losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum",
                                                         label_smoothing=self.config.label_smoothing)
        if weight:
            self.loss_sum += token_losses.detach()
            self.token_count += targets.numel()
        return token_losses * weight

    def epoch_stats(self, train_seconds: float) -> dict[str, Any]:
        total_loss, total_tokens = distributed.all_reduce_sum([self.loss_sum.item(), self.token_count], self.device)
        return {"train_loss": total_loss / total_tokens,
                "captions_per_second": round(self.examples / train_seconds, 1),
                "data_wait_share": round(self.data_seconds / train_seconds, 4)}

    def postfix(self) -> dict[str, str]:
        return {"loss": f"{self.loss_sum.item() / max(1, self.token_count):.3f}"}

    def describe(self) -> str:
        return (f"training {count_parameters(self.model) / 1e6:.2f}M parameters on {self.examples} captions of "
                f"{len(self.train_records)} images; vocabulary {len(self.vocab)} words; {self.steps_per_epoch} "
                "steps per epoch"
                + (f" of {self.config.batch_size} captions, {self.world} processes" if self.world > 1 else "")
                + (f"; {self.device}" if self.device.type != "cpu" else "")
                + (f", autocast {self.amp}" if self.amp_dtype else ""))

    def validate(self, model: CaptionDecoder) -> dict[str, float]:
        return validate(model, self.vocab, self.val_records, self.val_features, self.config.val_decode)


def train(train_records: list[CaptionRecord], train_features: Tensor, val_records: list[CaptionRecord],
          val_features: Tensor, out_dir: str | Path, model: ModelConfig | None = None,
          config: TrainConfig | None = None, encoder: dict[str, Any] | None = None, resume: bool = False,
          data_fingerprint: str | None = None, progress: bool = True,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
          device: str | torch.device = "cpu", amp: str | None = None,
          init_checkpoint: str | Path | None = None, overwrite: bool = False, data_name: str | None = None) -> Path:
    """Train a decoder; returns the path of the best checkpoint.

    `train_features` / `val_features` hold one row per record, in order. `model`: the new decoder's shape
    (default `ModelConfig()`; its vocab_size and feature_dim are set from the data). `on_epoch_end` is called with
    each epoch's log entry after the checkpoint is written (used to stop runs in tests).
    `device`: where the model trains (the features stay on the CPU; batches are moved). `amp`: None,
    "bf16" or "fp16" mixed precision (`autocast_dtype`). Under torchrun (a process group is initialised,
    see captioner.distributed) the run is data-parallel and `config.batch_size` is the global batch.
    `init_checkpoint`: start from this trained decoder (its shape, its CNN), grown to the new vocabulary.
    `resume` / `overwrite`: continue / replace the run `out_dir` holds (with neither, one is refused).
    `data_name`: what the run trains on, as its checkpoints record it.
    """
    config = config or TrainConfig()
    objective = TeacherForcing(train_records, train_features, val_records, val_features, config, model,
                               encoder, data_fingerprint, init_checkpoint)
    objective.data_name = data_name
    return Trainer(objective, out_dir, resume=resume, overwrite=overwrite, device=device, amp=amp,
                   ema_decay=config.ema_decay, progress=progress, on_epoch_end=on_epoch_end).run()


def train_on_cache(dataset: Any, features_dir: str | Path, out_dir: str | Path,
                   model: ModelConfig | None = None, config: TrainConfig | None = None,
                   resume: bool = False, progress: bool = True,
                   on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
                   device: str | torch.device = "cpu", amp: str | None = None,
                   init_checkpoint: str | Path | None = None, text_corpus: str | Path | None = None,
                   pseudo_target_p: float = 0.6, overwrite: bool = False, data_name: str | None = None) -> Path:
    """Train on a dataset's train split with features from a cache; select on its val split.

    `text_corpus`: captions without photos (`captioner.train.text_corpus`) added to the training split, each
    with a pseudo image vector from the cache CNN's ImageNet head (`pseudo_target_p`)."""
    splits = cached_splits(dataset, features_dir)
    fingerprint = dataset.fingerprint()
    if text_corpus is not None:
        records, features, description = text_corpus_examples(text_corpus, splits, pseudo_target_p)
        distributed.print0(description)
        splits["train_records"] = splits["train_records"] + records
        splits["train_features"] = torch.cat([splits["train_features"].float(), features])
        fingerprint = f"{fingerprint}+text:{corpus_fingerprint(records)}"
        data_name = data_name and f"{data_name} + {portable_path(text_corpus)}"
    return train(**splits, out_dir=out_dir, model=model, config=config, resume=resume, overwrite=overwrite,
                 data_fingerprint=fingerprint, progress=progress, on_epoch_end=on_epoch_end, device=device,
                 amp=amp, init_checkpoint=init_checkpoint, data_name=data_name)
