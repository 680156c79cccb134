"""Self-critical sequence training (Rennie et al. 2017): fine-tune an XE-trained decoder on CIDEr-D.

For each batch of training images, K captions per image are sampled from the model's own distribution
(with gradients), each is rewarded with its CIDEr-D against that image's references (document
frequencies fixed by the training references, `CiderDReward`), and the loss is

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

The run folder is laid out like `captioner.training`'s (last.safetensors to resume, best.safetensors
chosen by val CIDEr-D from real beam decoding, log.jsonl, curves.png). Epoch 0 in the log is the
initial (XE) model, validated before any update, and it competes for best.safetensors: the run never
hands back a model that validates worse than the one it started from. The image order of epoch e
depends only on (seed, e), sampling and dropout draw from torch's global RNG, whose state is saved with
every checkpoint, so a run interrupted after epoch k and resumed ends with the same weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

from captioner.checkpoint import CheckpointError, load_checkpoint, read_raw, save_checkpoint
from captioner.config import DecodeConfig, to_dict
from captioner.data.records import CaptionRecord
from captioner.decoding import beam_search, greedy
from captioner.metrics import CiderDReward
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary, tokenize
from captioner.training import (
    BEST,
    CURVES,
    LAST,
    LOG,
    _optimizer_tensors,
    _plot_curves,
    _restore_optimizer,
    validate,
)
from captioner.utils import progress_bar, write_text_atomic


@dataclass
class ScstConfig:
    """Settings of the self-critical fine-tuning stage."""

    epochs: int = 10
    batch_images: int = 50  # images per update; each contributes samples_per_image captions
    samples_per_image: int = 5
    lr: float = 5e-5  # constant: a small step away from the XE optimum, which CIDEr-D rewards can wreck
    weight_decay: float = 0.0  # no pull towards zero while fine-tuning
    max_length: int = 16  # sampled tokens, <end> included
    grad_clip: float = 5.0  # max global gradient norm
    baseline: Literal["mean", "greedy"] = "mean"
    candidates: Literal["sample", "beam"] = "sample"  # beam: the K best beams (length penalty of val_decode)
    dropout: float | None = None  # None: keep the XE model's dropout while sampling; else use this rate
    patience: int = 3  # epochs without val CIDEr-D improvement before stopping
    seed: int = 0
    val_decode: DecodeConfig = field(default_factory=lambda: DecodeConfig(strategy="beam", beam_size=3))
    val_max_images: int | None = None

    def __post_init__(self) -> None:
        if self.baseline not in ("mean", "greedy"):
            raise ValueError(f"ScstConfig.baseline must be 'mean' or 'greedy', got {self.baseline!r}")
        if self.candidates not in ("sample", "beam"):
            raise ValueError(f"ScstConfig.candidates must be 'sample' or 'beam', got {self.candidates!r}")
        if self.candidates == "beam" and self.baseline != "mean":
            raise ValueError("beam candidates are compared with each other: use the mean baseline")
        if self.baseline == "mean" and self.samples_per_image < 2:
            raise ValueError("the mean baseline averages the other samples of an image: samples_per_image "
                             f"must be at least 2, got {self.samples_per_image}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"ScstConfig.dropout must be in [0, 1) or None, got {self.dropout}")
        if self.samples_per_image < 1 or self.batch_images < 1 or self.max_length < 1 or self.epochs < 0:
            raise ValueError("samples_per_image, batch_images and max_length must be at least 1, epochs >= 0")


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
        chosen = _draw(allowed.softmax(dim=1), generator)  # (running,)
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


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
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


def _beam_scst_step(model: CaptionDecoder, vocab: Vocabulary, scorer: CiderDReward, features: Tensor,
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


def _scst_step(model: CaptionDecoder, vocab: Vocabulary, scorer: CiderDReward, features: Tensor,
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


def train_scst(train_records: list[CaptionRecord], train_features: Tensor, val_records: list[CaptionRecord],
               val_features: Tensor, out_dir: str | Path, init_checkpoint: str | Path, config: ScstConfig | None = None,
               resume: bool = False, progress: bool = True,
               on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
               features_encoder: dict[str, Any] | None = None) -> Path:
    """Fine-tune the decoder of `init_checkpoint` with SCST; returns the path of the best checkpoint.

    `train_features` / `val_features` hold one row per record, in order, from the same encoder the
    checkpoint was trained on (`features_encoder`, the cache's encoder entry, is checked against the
    checkpoint's when given). A checkpoint that carries its own CNN passes it on to the checkpoints
    written here. `on_epoch_end` is called with each epoch's log entry after the checkpoint is written
    (used to stop runs in tests).
    """
    config = config or ScstConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    initial = load_checkpoint(init_checkpoint)
    model, vocab = initial.model, initial.vocab
    if config.dropout is not None:  # the rate used while sampling; saved checkpoints keep the XE config
        set_dropout(model, config.dropout)
    if train_features.size(1) != model.config.feature_dim:
        raise ValueError(f"{initial.path}: the decoder expects {model.config.feature_dim}-dim image features, "
                         f"but the training features have {train_features.size(1)}; use the feature cache of "
                         "the encoder the checkpoint was trained with")
    cache_hash, model_hash = (features_encoder or {}).get("weights_hash"), initial.encoder.get("weights_hash")
    if cache_hash and model_hash and cache_hash != model_hash:
        raise ValueError(f"{initial.path}: trained on CNN weights {model_hash}, but the feature cache was made with "
                         f"{cache_hash}; make a cache with `captioner features --from-checkpoint {initial.path}`")
    train_features = train_features.float()
    scorer_start = time.perf_counter()
    scorer = CiderDReward(reference_tokens(train_records))
    print(f"reward: CIDEr-D with document frequencies of {len(train_records)} training images "
          f"({time.perf_counter() - scorer_start:.1f}s to index)")
    # Weight decay off by default: AdamW's decoupled decay would pull the XE weights towards zero.
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    num_images = len(train_records)
    steps_per_epoch = math.ceil(num_images / config.batch_images)
    run_info = {"stage": "scst", "scst_config": to_dict(config), "seed": config.seed,
                "init_checkpoint": str(initial.path), "init_info": initial.info,
                "data_fingerprint": initial.info.get("data_fingerprint"), "train_images": num_images}
    limit = config.val_max_images or len(val_records)
    val_records, val_features = val_records[:limit], val_features[:limit]
    history: list[dict[str, Any]] = []
    start_epoch, best_cider, bad_epochs = 1, -1.0, 0

    last_path = out_dir / LAST
    if resume and last_path.exists():
        tensors, metadata = read_raw(last_path)
        state = json.loads(metadata.get("training_state", "null") or "null")
        saved = json.loads(metadata.get("info", "{}"))
        if state is None or saved.get("stage") != "scst":
            raise CheckpointError(f"{last_path}: not an SCST training-state checkpoint; use a new --out folder")
        if saved.get("scst_config") != run_info["scst_config"] or json.loads(metadata["config"]) != to_dict(model.config):
            raise CheckpointError(f"{last_path}: the run was started with other settings; resume it with the "
                                  "same settings, or use a new --out folder")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _restore_optimizer(optimizer, tensors)
        torch.set_rng_state(tensors["rng.torch"])
        history, best_cider, bad_epochs = state["history"], state["best_cider"], state["bad_epochs"]
        start_epoch = state["epoch"] + 1
        print(f"resuming {out_dir} after epoch {state['epoch']} (best val CIDEr-D {best_cider:.4f})")
    elif resume:
        print(f"nothing to resume in {out_dir}: starting a new run")

    def finish_epoch(entry: dict[str, Any]) -> None:
        nonlocal best_cider, bad_epochs
        history.append(entry)
        improved = entry["val"]["CIDEr-D"] > best_cider
        best_cider, bad_epochs = (entry["val"]["CIDEr-D"], 0) if improved else (best_cider, bad_epochs + 1)
        entry["best"] = improved
        info = {**run_info, "epoch": entry["epoch"], "val_metrics": entry["val"],
                "val_decode": to_dict(config.val_decode)}
        if improved:
            save_checkpoint(out_dir / BEST, model, vocab, initial.encoder, info, encoder_state=initial.encoder_state)
        training_state = {"epoch": entry["epoch"], "history": history, "best_cider": best_cider,
                          "bad_epochs": bad_epochs}
        save_checkpoint(out_dir / LAST, model, vocab, initial.encoder, info, encoder_state=initial.encoder_state,
                        extra_tensors={**_optimizer_tensors(optimizer), "rng.torch": torch.get_rng_state()},
                        extra_metadata={"training_state": training_state})
        write_text_atomic(out_dir / LOG, "".join(json.dumps(h) + "\n" for h in history))
        _plot_curves(history, out_dir / CURVES, left_key="mean_reward",
                     left_title="SCST: mean CIDEr-D of sampled captions (train)", left_label="reward")

    if not history:  # epoch 0: the initial model, the score SCST has to beat
        val_start = time.perf_counter()
        val_scores = validate(model, vocab, val_records, val_features, config)
        finish_epoch({"epoch": 0, "mean_reward": None, "loss": None, "lr": config.lr, "val": val_scores,
                      "val_seconds": round(time.perf_counter() - val_start, 2)})
        print(f"initial model: val BLEU-4 {val_scores['BLEU-4'] * 100:.1f}  CIDEr-D {val_scores['CIDEr-D'] * 100:.1f}")

    print(f"SCST on {num_images} images, {config.samples_per_image} samples each, {config.baseline} baseline; "
          f"{steps_per_epoch} updates per epoch")
    for epoch in range(start_epoch, config.epochs + 1):
        if bad_epochs >= config.patience:
            break
        # Train mode: dropout stays on while sampling (the usual SCST practice), at the XE rate unless
        # `config.dropout` sets another. It keeps regularising, as SCST overfits the training references'
        # CIDEr-D easily, and each sample draws its own mask, which adds exploration; but at the XE rate
        # (0.5 on the word, the image and the output) the sampled captions are much worse than what the
        # model writes at test time. Validation decodes in eval mode (`validate` switches).
        model.train()
        epoch_start = time.perf_counter()
        reward_sum = loss_sum = greedy_sum = length_sum = score_seconds = 0.0
        sample_count = 0
        order = torch.randperm(num_images, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        bar = progress_bar(range(steps_per_epoch), desc=f"scst epoch {epoch}", enabled=progress)
        for step_in_epoch in bar:
            image_indices = order[step_in_epoch * config.batch_images:(step_in_epoch + 1) * config.batch_images]
            step = _beam_scst_step if config.candidates == "beam" else _scst_step
            batch = step(model, vocab, scorer, train_features[image_indices], image_indices, config)
            optimizer.zero_grad(set_to_none=True)
            batch["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            rows = batch["rewards"].numel()
            reward_sum += float(batch["rewards"].sum())
            loss_sum += batch["loss"].item() * rows
            length_sum += float(batch["lengths"].sum())
            if batch["greedy_rewards"] is not None:
                greedy_sum += float(batch["greedy_rewards"].sum()) * config.samples_per_image
            score_seconds += batch["score_seconds"]
            sample_count += rows
            if progress and step_in_epoch % 10 == 0:
                bar.set_postfix(reward=f"{reward_sum / sample_count:.3f}")
        train_seconds = time.perf_counter() - epoch_start
        val_start = time.perf_counter()
        val_scores = validate(model, vocab, val_records, val_features, config)
        entry = {"epoch": epoch, "mean_reward": reward_sum / sample_count, "loss": loss_sum / sample_count,
                 "lr": config.lr, "val": val_scores, "mean_sample_length": length_sum / sample_count,
                 "train_seconds": round(train_seconds, 2), "val_seconds": round(time.perf_counter() - val_start, 2),
                 "reward_seconds": round(score_seconds, 2),
                 "images_per_second": round(num_images / train_seconds, 1)}
        if config.baseline == "greedy":
            entry["mean_greedy_reward"] = greedy_sum / sample_count
        finish_epoch(entry)
        print(f"scst epoch {epoch}: mean reward {entry['mean_reward']:.3f}  val BLEU-4 "
              f"{val_scores['BLEU-4'] * 100:.1f}  CIDEr-D {val_scores['CIDEr-D'] * 100:.1f}"
              f"{'  (best)' if entry['best'] else ''}  {train_seconds:.0f}s train, {entry['val_seconds']:.0f}s val")
        if on_epoch_end is not None:
            on_epoch_end(entry)
    return out_dir / BEST


def mean_reward(model: CaptionDecoder, vocab: Vocabulary, scorer: CiderDReward, features: Tensor,
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
