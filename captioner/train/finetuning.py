"""Fine-tuning the CNN together with a trained decoder (`captioner train --objective finetune`).

An objective of the one trainer (captioner.train.trainer): init from a trained checkpoint (its decoder,
and its CNN: the checkpoint's own, or the default weights its encoder entry names); the parameter set is
both; the loss is teacher forcing on the training images: each step sends a batch of images through the
CNN (random horizontal flips; BatchNorm statistics stay frozen) and all the captions of each image
through the decoder, with separate learning rates for the CNN and the decoder (linear warm-up, cosine
decay to 0). Before training (epoch 0) and after every epoch the val images go through the current CNN
and are captioned with `val_decode`; the best epoch by val CIDEr-D is kept, the starting point included,
so best.safetensors always exists.

Checkpoints carry the decoder as `model.*` and the CNN as `encoder.*`: every command loads them with
their CNN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from captioner.checkpoint import Checkpoint, checkpoint_label
from captioner.config import FinetuneConfig, to_dict
from captioner.data.records import CaptionRecord
from captioner.encoders.registry import DEFAULT_ENCODER, Encoder, check_trained_cnn, get_encoder_spec
from captioner.encoders.weights import state_dict_hash
from captioner.evaluation.validate import validate
from captioner.features.encode import encode_images
from captioner.features.loader import image_loader
from captioner.model import CaptionDecoder
from captioner.train.data import CaptionTensors, encode_split
from captioner.train.schedule import warmup_cosine
from captioner.train.state import strip_prefix
from captioner.train.trainer import Objective, Trainer


class CnnFinetuning(Objective):
    """Teacher forcing through the CNN and the decoder on images; init: a trained checkpoint."""

    name = "CNN fine-tuning"
    validates_start = True
    epochs_fixed = ("its learning rates follow one warm-up and cosine decay over all the run's epochs, so a run "
                    "continued to other epochs would not be the run of that many epochs")

    def __init__(self, init_checkpoint: str | Path, train_records: list[CaptionRecord],
                 val_records: list[CaptionRecord], config: FinetuneConfig) -> None:
        self.init_from, self.config = str(init_checkpoint), config
        self.train_records = train_records[:config.train_max_images]
        self.val_records = val_records[:config.val_max_images]

    def prepare(self, device: torch.device, amp: str | None, initial: Checkpoint | None) -> None:
        self.checkpoint = checkpoint = initial
        self.model, self.vocab = checkpoint.model.to(device), checkpoint.vocab
        spec = get_encoder_spec(checkpoint.encoder.get("encoder", DEFAULT_ENCODER))
        cnn = spec.build(checkpoint.encoder_state).to(device)  # BatchNorm not folded: it is trained through
        self.start_hash = state_dict_hash(cnn.state_dict())
        cnn.requires_grad_(True)
        self.cnn = Encoder(spec, cnn, self.start_hash, "fine-tuned")
        check_trained_cnn(self.cnn, checkpoint.encoder, self.init_from)
        self.captions = encode_split(self.train_records, torch.zeros(len(self.train_records), 1), self.vocab,
                                     self.config.max_caption_length)
        self.captions_of: list[list[int]] = [[] for _ in self.train_records]  # caption rows of each image
        for caption, row in enumerate(self.captions.image_rows.tolist()):
            self.captions_of[row].append(caption)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.cnn.model.parameters()), "lr": self.config.encoder_lr},
                {"params": list(self.model.parameters()), "lr": self.config.decoder_lr}]

    def learning_rates(self, step: int, total_steps: int) -> list[float]:
        return [warmup_cosine(base, step, total_steps, self.config.warmup_steps)
                for base in (self.config.encoder_lr, self.config.decoder_lr)]

    @property
    def examples(self) -> int:
        return len(self.train_records)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.examples / self.config.batch_images)

    def settings(self) -> dict[str, Any]:
        return {"finetune_config": self.config, "init_checkpoint": checkpoint_label(self.init_from)}

    def run_info(self) -> dict[str, Any]:
        return {**self.checkpoint.info, "finetune_config": to_dict(self.config),
                "init_checkpoint": checkpoint_label(self.init_from), "fine_tuned_from": self.start_hash,
                "train_images": self.examples}

    def encoder(self) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
        state = self.cnn.model.state_dict()
        weights_hash = state_dict_hash(state)
        if weights_hash == self.start_hash and self.checkpoint.encoder_state is None:
            return self.checkpoint.encoder, None  # epoch 0: the starting checkpoint's CNN, as it named it
        return {**self.checkpoint.encoder, "weights_hash": weights_hash, "fine_tuned_from": self.start_hash}, state

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        cnn = strip_prefix(tensors, "encoder.")
        if cnn:  # none when saved at epoch 0, before the CNN changed
            self.cnn.model.load_state_dict(cnn)

    def start_epoch(self) -> None:
        self.cnn.model.eval()  # BatchNorm statistics stay as they are; gradients still flow
        self.model.train()
        self.loss_sum, self.token_sum = 0.0, 0

    def batches(self, order: Tensor) -> Iterator[tuple[Tensor, list[int]] | None]:
        """(images, their training rows) per step; None for a step whose images all failed to load."""
        loader = image_loader([self.train_records[i].image_path for i in order.tolist()], self.cnn,
                              batch_size=self.config.batch_images)
        for batch in loader:
            yield (batch.images, [int(order[p]) for p in batch.indices]) if batch.indices else None

    def loss(self, batch: tuple[Tensor, list[int]], module: torch.nn.Module, autocast: Callable[[], Any]) -> Tensor:
        images, image_rows = batch
        if self.config.flip:
            flip = torch.rand(len(images)) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(3), images)
        features = self.cnn.model(images)  # (B, D)
        loss, tokens = caption_loss(module, features, image_rows, self.captions_of, self.captions,
                                    self.config.label_smoothing)
        self.loss_sum += loss.item() * tokens
        self.token_sum += tokens
        return loss

    def epoch_stats(self, train_seconds: float) -> dict[str, Any]:
        return {"train_loss": self.loss_sum / max(1, self.token_sum),
                "images_per_second": round(self.examples / train_seconds, 1)}

    def describe(self) -> str:
        return (f"fine-tuning {self.cnn.name} and the decoder of {self.init_from} on {self.examples} images, "
                f"{self.steps_per_epoch} steps of {self.config.batch_images} images per epoch")

    def validate(self, model: CaptionDecoder) -> dict[str, float]:
        """The val images through the current CNN (the one route, `encode_images`: float16-rounded as every
        other door's features), then decoded and scored as `captioner train` does."""
        self.cnn.model.eval()
        encoded = encode_images([r.image_path for r in self.val_records], self.cnn, batch_size=64)
        if encoded.failures:
            failed = ", ".join(f"{self.val_records[i].image_path} ({reason})" for i, reason in encoded.failures)
            raise ValueError(f"val images failed to load: {failed}")
        return validate(model, self.vocab, self.val_records, encoded.features, self.config.val_decode)


def caption_loss(decoder: torch.nn.Module, features: Tensor, image_rows: list[int], captions_of: list[list[int]],
                 captions: CaptionTensors, label_smoothing: float) -> tuple[Tensor, int]:
    """Mean teacher-forced cross-entropy of all captions of the batch's images (features[j] is the image
    of training row image_rows[j]); also the token count."""
    position = {row: j for j, row in enumerate(image_rows)}
    chosen, tokens, lengths = captions.longest_first(torch.tensor([c for row in image_rows for c in captions_of[row]]))
    images = torch.tensor([position[row] for row in captions.image_rows[chosen].tolist()], device=features.device)
    logits, targets = decoder(features[images], tokens.to(features.device), lengths)
    loss = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return loss, len(targets)


def finetune(init_checkpoint: str | Path, train_records: list[CaptionRecord], val_records: list[CaptionRecord],
             out_dir: str | Path, config: FinetuneConfig | None = None, resume: bool = False,
             progress: bool = True, on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
             device: str | torch.device = "cpu", overwrite: bool = False, data_name: str | None = None) -> Path:
    """Fine-tune the CNN and the decoder of `init_checkpoint`; returns the best checkpoint's path, which
    exists (the starting point, with its CNN, when no epoch beat it). `on_epoch_end(entry)` is called
    after each epoch's files are written (tests stop runs with it). `resume` / `overwrite`: continue /
    replace the run `out_dir` holds (with neither, one is refused). `data_name`: what the run trains on."""
    objective = CnnFinetuning(init_checkpoint, train_records, val_records, config or FinetuneConfig())
    objective.data_name = data_name
    return Trainer(objective, out_dir, resume=resume, overwrite=overwrite, device=device, progress=progress,
                   on_epoch_end=on_epoch_end).run()
