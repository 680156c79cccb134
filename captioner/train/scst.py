"""Self-critical sequence training (Rennie et al. 2017): fine-tune an XE-trained decoder on CIDEr-D.

For each batch of training images, K captions per image are sampled from the model's own distribution
(with gradients), each is rewarded with its CIDEr-D against that image's references (document
frequencies fixed by the training references, `CiderD(corpus_references)`), and the loss is

    loss = -mean over samples of (reward - baseline) * sum of the sample's token log-probs (<end> incl.)

The baseline is the mean reward of the image's other K-1 samples (Luo 2020, "a better variant of
self-critical sequence training"), or, with `baseline="greedy"`, the reward of the image's greedy
caption (the original SCST). Either way the baseline does not depend on the sample it is subtracted
from, so the gradient stays unbiased.

With `candidates="beam"` the K captions of an image are not sampled but are its K best beam-search
hypotheses (decoded without dropout, as at test time), and their log-probs are recomputed with gradients
by teacher forcing; the baseline is again the mean reward of the others. This is no longer an unbiased
policy gradient but a re-ranking one: among the captions beam search would actually choose between,
it raises the ones the references score higher. It also avoids the rare-word noise that sampling draws
from a model trained with label smoothing (about one token in ten).

SCST is an objective of the one trainer (captioner.train.trainer): the run folder, resume, best/last,
the log, curves and early stopping are the trainer's. Epoch 0 in the log is the initial (XE) model,
validated before any update, and it competes for best.safetensors: the run never hands back a model
that validates worse than the one it started from. Sampling and dropout draw from torch's global RNG,
whose state is saved with every checkpoint, so a run interrupted after epoch k and resumed ends with the
same weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

from captioner.checkpoint import Checkpoint, portable_path
from captioner.config import DecodeConfig, ScstConfig, to_dict
from captioner.data.records import CaptionRecord
from captioner.decoding import beam_search, greedy
from captioner.evaluation.validate import validate
from captioner.metrics.cider import CiderD
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary, tokenize
from captioner.train.trainer import Objective, Trainer
from captioner.train.warm_start import check_features_encoder


@dataclass
class SampledCaptions:
    """Captions sampled with gradients: rows are image-major (image 0's K samples, then image 1's, ...)."""

    tokens: Tensor  # (rows, max_length) emitted tokens, <end> included when emitted, then <pad>
    lengths: Tensor  # (rows,) emitted tokens, <end> included
    log_probs: Tensor  # (rows,) sum of the model's log-probs of the emitted tokens; carries gradients
    finished: Tensor  # (rows,) bool: emitted <end> (False: cut at max_length)


def sample_captions(model: CaptionDecoder, image_features: Tensor, vocab: Vocabulary, samples_per_image: int,
                    max_length: int, generator: torch.Generator | None = None) -> SampledCaptions:
    """Sample `samples_per_image` captions per image (B, D) from the model, keeping the autograd graph.

    All B*K rows advance together, one `model.step` per token; rows that emit <end> leave the batch, so
    later steps cost only what is still running. <pad>, <start> and <unk> are never drawn: tokens come
    from the model's distribution renormalised over the other words, but the log-prob kept for the
    gradient is the model's own log-softmax value (as `decoding` reports it, and as teacher forcing
    through `model.forward` recomputes it).
    """
    device = image_features.device
    rows = image_features.size(0) * samples_per_image
    # Each sample gets its own init_state (and its own dropout mask on the image in train mode), so the
    # K samples of an image are independent draws and the others' mean is a fair baseline.
    state = model.init_state(image_features.repeat_interleave(samples_per_image, dim=0))
    banned = torch.tensor([vocab.pad_id, vocab.start_id, vocab.unk_id], device=device)
    tokens_in = torch.full((rows,), vocab.start_id, dtype=torch.long, device=device)
    running = torch.arange(rows, device=device)  # rows still sampling
    tokens = torch.full((rows, max_length), vocab.pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    total = image_features.new_zeros(rows)
    for t in range(max_length):
        log_probs, state = model.step(tokens_in, state)  # (running, V)
        allowed = log_probs.detach().index_fill(1, banned, float("-inf"))
        chosen = draw(allowed.softmax(dim=1), generator)  # (running,)
        total = total.index_add(0, running, log_probs.gather(1, chosen.unsqueeze(1)).squeeze(1))
        tokens[running, t] = chosen
        lengths[running] += 1
        going_on = chosen != vocab.end_id
        if not bool(going_on.any()):
            break
        running, tokens_in = running[going_on], chosen[going_on]
        state = tuple(s[going_on] for s in state)
    finished = (tokens == vocab.end_id).any(dim=1)
    return SampledCaptions(tokens, lengths, total, finished)


def set_dropout(model: CaptionDecoder, rate: float) -> None:
    """Use dropout `rate` in train mode from now on (word, image, output, and between LSTM layers)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate
    if model.config.num_layers > 1:
        model.lstm.dropout = rate


def draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row of probs (rows, V) by inverse CDF: one uniform per row, where `torch.multinomial`
    draws an exponential per vocabulary entry (a seventh of an SCST step's time on a 2.5k vocabulary)."""
    cumulative = probs.double().cumsum(dim=1)  # (rows, V); float64 keeps the tail's rounding negligible
    uniform = torch.rand(probs.size(0), 1, generator=generator, dtype=torch.float64, device=probs.device)
    # right=True skips zero-probability entries (equal cumulative values); the clamp only matters if
    # rounding puts uniform * total on the total itself.
    chosen = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
    return chosen.squeeze(1).clamp_max(probs.size(1) - 1)


def caption_words(tokens: Tensor, vocab: Vocabulary) -> list[list[str]]:
    """Token rows (<end> and <pad> allowed) -> word lists, as the reward sees them."""
    return [vocab.decode(row) for row in tokens.tolist()]


def advantages(rewards: Tensor, baseline: str = "mean", greedy_rewards: Tensor | None = None) -> Tensor:
    """rewards (images, K) -> reward minus baseline, (images, K).

    "mean": the mean reward of the image's other K-1 samples, so each image's advantages sum to zero;
    "greedy": the reward of the image's greedy caption, `greedy_rewards` (images,).
    """
    if baseline == "mean":
        samples = rewards.size(1)
        if samples < 2:
            raise ValueError("the mean baseline needs at least 2 samples per image")
        others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (samples - 1)
        return rewards - others_mean
    if baseline == "greedy":
        if greedy_rewards is None:
            raise ValueError("the greedy baseline needs greedy_rewards")
        return rewards - greedy_rewards.unsqueeze(1)
    raise ValueError(f"unknown baseline {baseline!r}; use 'mean' or 'greedy'")


def reference_tokens(records: list[CaptionRecord]) -> list[list[list[str]]]:
    """Each record's captions tokenised as the metrics tokenise them (one list per image)."""
    references = []
    for record in records:
        if not record.captions:
            raise ValueError(f"training image {record.image_id} has no reference captions, so no reward; "
                             "leave it out of the SCST data")
        references.append([tokenize(caption) for caption in record.captions])
    return references


def beam_candidates(model: CaptionDecoder, image_features: Tensor, vocab: Vocabulary, beams: int,
                    max_length: int, length_penalty: float) -> tuple[list[list[list[int]]], list[list[bool]]]:
    """Each image's `beams` best beam-search captions (fewer only for a degenerate vocabulary), decoded in
    eval mode without gradients: (token lists without <start>/<end>, whether each emitted <end>)."""
    was_training = model.training
    model.eval()
    try:
        config = DecodeConfig(strategy="beam", beam_size=beams, n_best=beams, max_length=max_length,
                              length_penalty=length_penalty)
        hypotheses = beam_search(model, image_features, config, vocab.start_id, vocab.end_id,
                                 suppress_ids=(vocab.pad_id, vocab.start_id, vocab.unk_id))
    finally:
        model.train(was_training)
    return ([[h.tokens for h in image] for image in hypotheses],
            [[h.finished for h in image] for image in hypotheses])


def caption_log_probs(model: CaptionDecoder, image_features: Tensor, captions: list[list[int]],
                      finished: list[bool], vocab: Vocabulary) -> Tensor:
    """Sum of the model's log-probs of each caption's tokens (<end> included when `finished`), by teacher
    forcing with gradients; image_features has one row per caption. Returns (captions,)."""
    rows = [[vocab.start_id, *tokens, *([vocab.end_id] if done else [])] for tokens, done in zip(captions, finished, strict=True)]
    lengths = torch.tensor([len(row) for row in rows])
    order = lengths.argsort(descending=True, stable=True)
    padded = torch.full((len(rows), int(lengths.max())), vocab.pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, :len(row)] = torch.tensor(row)
    device = image_features.device
    padded, lengths = padded[order].to(device), lengths[order]
    logits, targets = model(image_features[order.to(device)], padded, lengths)
    token_log_probs = torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    # which (sorted) caption each packed token belongs to, packed the same way as the targets
    owner = torch.arange(len(rows)).unsqueeze(1).expand(-1, padded.size(1) - 1)
    owner = pack_padded_sequence(owner, lengths - 1, batch_first=True).data.to(device)
    sums = token_log_probs.new_zeros(len(rows)).index_add(0, owner, token_log_probs)
    return sums[order.argsort().to(device)]


def beam_scst_step(model: CaptionDecoder, vocab: Vocabulary, scorer: CiderD, features: Tensor,
                    image_indices: Tensor, config: ScstConfig) -> dict[str, Any]:
    """Reward the K best beams of each image against the mean of the others; loss with gradients."""
    captions, finished = beam_candidates(model, features, vocab, config.samples_per_image, config.max_length,
                                         config.val_decode.length_penalty)
    score_start = time.perf_counter()
    counts = [len(image) for image in captions]
    flat = [tokens for image in captions for tokens in image]
    flat_finished = [done for image in finished for done in image]
    owners = [int(index) for index, count in zip(image_indices, counts, strict=True) for _ in range(count)]
    rewards = torch.from_numpy(scorer.score_images([vocab.decode(tokens) for tokens in flat], owners)).float()
    score_seconds = time.perf_counter() - score_start
    advantage = torch.cat([advantages(image.view(1, -1), "mean").view(-1) if image.numel() > 1 else torch.zeros_like(image)
                           for image in rewards.split(counts)])
    rows = torch.arange(features.size(0)).repeat_interleave(torch.tensor(counts)).to(features.device)
    log_probs = caption_log_probs(model, features[rows], flat, flat_finished, vocab)
    loss = -(advantage.to(log_probs.device) * log_probs).mean()
    lengths = torch.tensor([len(tokens) + done for tokens, done in zip(flat, flat_finished, strict=True)])
    return {"loss": loss, "rewards": rewards, "greedy_rewards": None, "lengths": lengths,
            "score_seconds": score_seconds}


def sample_scst_step(model: CaptionDecoder, vocab: Vocabulary, scorer: CiderD, features: Tensor,
                     image_indices: Tensor, config: ScstConfig) -> dict[str, Any]:
    """Sample, reward, and return the loss (with gradients) and batch statistics."""
    samples = config.samples_per_image
    sampled = sample_captions(model, features, vocab, samples, config.max_length)
    score_start = time.perf_counter()
    sample_indices = image_indices.repeat_interleave(samples).tolist()
    rewards = torch.from_numpy(scorer.score_images(caption_words(sampled.tokens, vocab), sample_indices)).float()
    greedy_rewards = None
    if config.baseline == "greedy":
        # The greedy caption of the current model, decoded without dropout (test-time behaviour).
        model.eval()
        hypotheses = greedy(model, features, DecodeConfig(strategy="greedy", max_length=config.max_length),
                            vocab.start_id, vocab.end_id, suppress_ids=(vocab.pad_id, vocab.start_id, vocab.unk_id))
        model.train()
        greedy_words = [vocab.decode(image_hypotheses[0].tokens) for image_hypotheses in hypotheses]
        greedy_rewards = torch.from_numpy(scorer.score_images(greedy_words, image_indices.tolist())).float()
    score_seconds = time.perf_counter() - score_start
    advantage = advantages(rewards.view(-1, samples), config.baseline, greedy_rewards).view(-1)
    loss = -(advantage.to(sampled.log_probs.device) * sampled.log_probs).mean()
    return {"loss": loss, "rewards": rewards, "greedy_rewards": greedy_rewards, "lengths": sampled.lengths,
            "score_seconds": score_seconds}


class SelfCritical(Objective):
    """SCST: reward each image's sampled (or beam) captions with CIDEr-D against a baseline; init: a
    cross-entropy checkpoint. Runs in one process, in float32."""

    name = "SCST"
    label = "scst "
    validates_start = True
    curve = ("mean_reward", "SCST: mean CIDEr-D of sampled captions (train)", "reward")

    def __init__(self, train_records: list[CaptionRecord], train_features: Tensor, val_records: list[CaptionRecord],
                 val_features: Tensor, init_checkpoint: str | Path, config: ScstConfig,
                 features_encoder: dict[str, Any] | None = None) -> None:
        self.config, self.init_from, self.features_encoder = config, str(init_checkpoint), features_encoder or {}
        self.train_records, self.train_features = train_records, train_features.float()
        limit = config.val_max_images or len(val_records)
        self.val_records, self.val_features = val_records[:limit], val_features[:limit]

    def prepare(self, device: torch.device, amp: str | None, initial: Checkpoint | None) -> None:
        config = self.config
        self.device = device
        self.initial = initial
        self.model, self.vocab = initial.model.to(device), initial.vocab
        if config.dropout is not None:  # the rate used while sampling; saved checkpoints keep the XE config
            set_dropout(self.model, config.dropout)
        check_features_encoder(initial, self.features_encoder, self.train_features.size(1))
        scorer_start = time.perf_counter()
        self.scorer = CiderD(reference_tokens(self.train_records))
        print(f"reward: CIDEr-D with document frequencies of {len(self.train_records)} training images "
              f"({time.perf_counter() - scorer_start:.1f}s to index)")

    @property
    def examples(self) -> int:
        return len(self.train_records)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.examples / self.config.batch_images)

    def settings(self) -> dict[str, Any]:
        return {"scst_config": self.config}

    def run_info(self) -> dict[str, Any]:
        initial = self.initial
        return {"stage": "scst", "scst_config": to_dict(self.config), "seed": self.config.seed,
                "init_checkpoint": portable_path(initial.path), "init_info": initial.info,
                "data_fingerprint": initial.info.get("data_fingerprint"), "train_images": self.examples}

    def encoder(self) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
        return self.initial.encoder, self.initial.encoder_state  # the checkpoint's own CNN, passed on unchanged

    def start_epoch(self) -> None:
        # Train mode: dropout stays on while sampling (the usual SCST practice), at the XE rate unless
        # `config.dropout` sets another. It keeps regularising, as SCST overfits the training references'
        # CIDEr-D easily, and each sample draws its own mask, which adds exploration; but at the XE rate
        # (0.5 on the word, the image and the output) the sampled captions are much worse than what the
        # model writes at test time. Validation decodes in eval mode (`decode_features` switches).
        self.model.train()
        self.reward_sum = self.loss_sum = self.greedy_sum = self.length_sum = self.score_seconds = 0.0
        self.sample_count = 0

    def batches(self, order: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """(features, training-image indices) of each batch of images."""
        for step in range(self.steps_per_epoch):
            image_indices = order[step * self.config.batch_images:(step + 1) * self.config.batch_images]
            yield self.train_features[image_indices].to(self.device), image_indices

    def loss(self, batch: tuple[Tensor, Tensor], module: torch.nn.Module, autocast: Callable[[], Any]) -> Tensor:
        features, image_indices = batch
        step = beam_scst_step if self.config.candidates == "beam" else sample_scst_step
        result = step(self.model, self.vocab, self.scorer, features, image_indices, self.config)
        rows = result["rewards"].numel()
        self.reward_sum += float(result["rewards"].sum())
        self.loss_sum += result["loss"].item() * rows
        self.length_sum += float(result["lengths"].sum())
        if result["greedy_rewards"] is not None:
            self.greedy_sum += float(result["greedy_rewards"].sum()) * self.config.samples_per_image
        self.score_seconds += result["score_seconds"]
        self.sample_count += rows
        return result["loss"]

    def epoch_stats(self, train_seconds: float) -> dict[str, Any]:
        stats = {"mean_reward": self.reward_sum / self.sample_count, "loss": self.loss_sum / self.sample_count,
                 "mean_sample_length": self.length_sum / self.sample_count,
                 "reward_seconds": round(self.score_seconds, 2),
                 "images_per_second": round(self.examples / train_seconds, 1)}
        if self.config.baseline == "greedy":
            stats["mean_greedy_reward"] = self.greedy_sum / self.sample_count
        return stats

    def start_entry(self) -> dict[str, Any]:
        return {"mean_reward": None, "loss": None, "lr": self.config.lr}

    def summary(self, entry: dict[str, Any]) -> str:
        return f"mean reward {entry['mean_reward']:.3f}"

    def postfix(self) -> dict[str, str]:
        return {"reward": f"{self.reward_sum / max(1, self.sample_count):.3f}"}

    def describe(self) -> str:
        return (f"SCST on {self.examples} images, {self.config.samples_per_image} samples each, "
                f"{self.config.baseline} baseline; {self.steps_per_epoch} updates per epoch")

    def validate(self, model: CaptionDecoder) -> dict[str, float]:
        return validate(model, self.vocab, self.val_records, self.val_features, self.config.val_decode)


def train_scst(train_records: list[CaptionRecord], train_features: Tensor, val_records: list[CaptionRecord],
               val_features: Tensor, out_dir: str | Path, init_checkpoint: str | Path, config: ScstConfig | None = None,
               resume: bool = False, progress: bool = True,
               on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
               features_encoder: dict[str, Any] | None = None, device: str | torch.device = "cpu",
               overwrite: bool = False, data_name: str | None = None) -> Path:
    """Fine-tune the decoder of `init_checkpoint` with SCST; returns the path of the best checkpoint.

    `train_features` / `val_features` hold one row per record, in order, from the same encoder the
    checkpoint was trained on (`features_encoder`, the cache's encoder entry, is checked against the
    checkpoint's when given). A checkpoint that carries its own CNN passes it on to the checkpoints
    written here. `on_epoch_end` is called with each epoch's log entry after the checkpoint is written
    (used to stop runs in tests). `resume` / `overwrite`: continue / replace the run `out_dir` holds (with
    neither, one is refused); the learning rate is constant, so a run may be resumed with more epochs.
    `data_name`: what the run trains on, as its checkpoints record it.
    """
    objective = SelfCritical(train_records, train_features, val_records, val_features, init_checkpoint,
                             config or ScstConfig(), features_encoder)
    objective.data_name = data_name
    return Trainer(objective, out_dir, resume=resume, overwrite=overwrite, device=device, progress=progress,
                   on_epoch_end=on_epoch_end).run()


def mean_reward(model: CaptionDecoder, vocab: Vocabulary, scorer: CiderD, features: Tensor,
                samples_per_image: int, max_length: int, seed: int = 0) -> float:
    """Mean CIDEr-D of captions sampled from the model in eval mode (no gradients): a progress probe."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sampled = sample_captions(model, features, vocab, samples_per_image, max_length,
                                      generator=torch.Generator().manual_seed(seed))
    finally:
        model.train(was_training)
    indices = np.repeat(np.arange(features.size(0)), samples_per_image).tolist()
    return float(scorer.score_images(caption_words(sampled.tokens, vocab), indices).mean())
