"""Teacher-forced training on cached image features, with real-decoding validation and resume.

A run folder holds:
  last.safetensors   the whole training state (weights, optimizer, RNG, history): `--resume` reads it
  best.safetensors   the weights of the best epoch by val CIDEr-D: a usable checkpoint
  log.jsonl          one line per epoch (loss, val scores, lr, seconds, throughput)
  curves.png         training loss and val scores per epoch

The data order of epoch e depends only on (seed, e) and the RNG state is saved with every
checkpoint, so a run interrupted after epoch k and resumed ends with the same weights as an
uninterrupted run.

Under torchrun the model is wrapped in DistributedDataParallel and `batch_size` is the GLOBAL batch:
every rank draws the same epoch order, and rank r of W trains on captions r, r+W, r+2W, ... of each
global batch. Each rank's loss is its sum over tokens divided by the global batch's token count (times
W, because DDP averages gradients over ranks), so the update, the learning rate and the logged loss mean
what they mean in one process with the same batch size. Only rank 0 writes files; val decoding is split
over the ranks and scored on rank 0, and every rank gets the scores, so all agree on best and stopping.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from captioner import distributed
from captioner.checkpoint import CheckpointError, read_raw, save_checkpoint
from captioner.config import DecodeConfig, ModelConfig, TrainConfig, to_dict
from captioner.data.records import CaptionRecord
from captioner.inference import decode_features
from captioner.metrics import compute_scores
from captioner.model import CaptionDecoder, count_parameters
from captioner.text import Vocabulary, tokenize
from captioner.utils import progress_bar, write_text_atomic

LAST, BEST, LOG, CURVES = "last.safetensors", "best.safetensors", "log.jsonl", "curves.png"


@dataclass
class CaptionTensors:
    """Every (image, caption) pair of a split, encoded once: rows of `tokens` index `features`."""

    features: Tensor  # (images, D) float32
    image_rows: Tensor  # (captions,) row of each caption's image in `features`
    tokens: Tensor  # (captions, L) <start> ... <end> <pad>...
    lengths: Tensor  # (captions,) <start> .. <end> inclusive

    def longest_first(self, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The given captions sorted longest first: their indices, tokens (cut to the longest), lengths."""
        lengths = self.lengths[indices]
        order = torch.argsort(lengths, descending=True)
        indices, lengths = indices[order], lengths[order]
        return indices, self.tokens[indices, :int(lengths[0])], lengths

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Features, tokens and lengths of the given captions, sorted longest first."""
        indices, tokens, lengths = self.longest_first(indices)
        return self.features[self.image_rows[indices]], tokens, lengths


def encode_split(records: list[CaptionRecord], features: Tensor, vocab: Vocabulary,
                 max_caption_length: int) -> CaptionTensors:
    """Encode captions of `records` (whose features are the rows of `features`, in order)."""
    image_rows, encoded = [], []
    for row, record in enumerate(records):
        for caption in record.captions:
            words = tokenize(caption)[:max_caption_length]
            if words:
                image_rows.append(row)
                encoded.append(vocab.encode(words))
    if not encoded:
        raise ValueError("no usable training captions (every caption is empty after tokenisation)")
    lengths = torch.tensor([len(ids) for ids in encoded])
    tokens = torch.full((len(encoded), int(lengths.max())), vocab.pad_id, dtype=torch.long)
    for i, ids in enumerate(encoded):
        tokens[i, :len(ids)] = torch.tensor(ids)
    return CaptionTensors(features, torch.tensor(image_rows), tokens, lengths)


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from `lr` to `min_lr`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging), kept in a second model.

    After update k: average = d·average + (1 − d)·weights with d = min(decay, (1 + k) / (10 + k)), so the
    first averages follow the weights closely instead of remembering the random initialisation.
    """

    def __init__(self, model: CaptionDecoder, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight-average decay must be between 0 and 1 (exclusive), not {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: CaptionDecoder) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, current in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if average.is_floating_point():
                average.lerp_(current, 1.0 - decay)
            else:
                average.copy_(current)

    def tensors(self) -> dict[str, Tensor]:
        return {f"ema.{name}": value for name, value in self.model.state_dict().items()}

    def load(self, tensors: dict[str, Tensor], updates: int) -> None:
        self.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        self.updates = updates


def validate(model: CaptionDecoder, vocab: Vocabulary, records: list[CaptionRecord], features: Tensor,
             config: Any) -> dict[str, float]:
    """Decode the val images for real (never teacher-forced) with `config.val_decode` and score them.

    Under torchrun the ranks decode a share each, rank 0 scores all of them and every rank returns the
    scores."""
    texts = decode_across_ranks(model, vocab, features, config.val_decode)
    scores = None
    if distributed.is_main():
        references = {r.image_id: r.captions for r in records}
        hypotheses = {r.image_id: text for r, text in zip(records, texts, strict=True)}
        all_scores = compute_scores(references, hypotheses)
        scores = {"BLEU-4": all_scores["BLEU-4"], "CIDEr-D": all_scores["CIDEr-D"]}
    return distributed.broadcast_object(scores)


def decode_across_ranks(model: CaptionDecoder, vocab: Vocabulary, features: Tensor, config: DecodeConfig) -> list[str]:
    """The best caption of every row of `features`, in row order, on every rank; under torchrun rank r
    decodes rows r, r+W, r+2W, ... and the shares are gathered."""
    world, rank = distributed.world_size(), distributed.rank()
    captions = decode_features(model, vocab, features[rank::world], config)
    shares = distributed.all_gather_object([c[0].text for c in captions])  # shares[k][i]: row k + i*W
    return [shares[row % world][row // world] for row in range(features.size(0))]


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
    return torch.bfloat16  # CPU autocast works, but is only faster on CPUs with bfloat16 units


def _rank_seed(seed: int, rank: int) -> int:
    """Dropout seed of rank > 0 (rank 0 keeps the single-process random stream)."""
    return (seed * 1_000_003 + rank * 7_919) % (2**63)


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _rng_tensors(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Every rank's random state: rank 0's CPU state as `rng.torch` (as single-process runs save it)."""
    tensors = {}
    for rank, state in enumerate(states):
        tensors["rng.torch" if rank == 0 else f"rng.torch.rank{rank}"] = state["cpu"]
        if "cuda" in state:
            tensors[f"rng.cuda.rank{rank}"] = state["cuda"]
    return tensors


def _restore_rng(tensors: dict[str, Tensor], device: torch.device, seed: int, epoch: int) -> bool:
    """Restore this rank's saved random state; False when the run was saved by fewer processes, in which
    case this rank is reseeded from (seed, epoch, rank)."""
    rank = distributed.rank()
    cpu = tensors.get("rng.torch" if rank == 0 else f"rng.torch.rank{rank}")
    if cpu is None:
        torch.manual_seed(_rank_seed(seed + epoch, rank))
        return False
    torch.set_rng_state(cpu)
    if device.type == "cuda" and f"rng.cuda.rank{rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"], device)
    return True


# --------------------------------------------------------------------------------- training state
def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value)
    return tensors


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _plot_curves(history: list[dict[str, Any]], path: Path, left_key: str = "train_loss",
                 left_title: str = "training loss (teacher forced)", left_label: str = "cross-entropy") -> None:
    """`left_key` per epoch on the left (epochs without it are skipped), val scores on the right."""
    import matplotlib

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
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=90)
    plt.close(figure)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- the loop
def train(train_records: list[CaptionRecord], train_features: Tensor, val_records: list[CaptionRecord],
          val_features: Tensor, out_dir: str | Path, model_config: dict[str, Any] | None = None,
          config: TrainConfig | None = None, encoder: dict[str, Any] | None = None, resume: bool = False,
          data_fingerprint: str | None = None, progress: bool = True,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
          device: str | torch.device = "cpu", amp: str | None = None) -> Path:
    """Train a decoder; returns the path of the best checkpoint.

    `train_features` / `val_features` hold one row per record, in order. `model_config` overrides
    ModelConfig fields (vocab_size and feature_dim are filled in here). `on_epoch_end` is called with
    each epoch's log entry after the checkpoint is written (used to stop runs in tests).
    `device`: where the model trains (the features stay on the CPU; batches are moved). `amp`: None,
    "bf16" or "fp16" mixed precision (`autocast_dtype`). Under torchrun (a process group is initialised,
    see captioner.distributed) the run is data-parallel and `config.batch_size` is the global batch.
    """
    config = config or TrainConfig()
    device = torch.device(device)
    amp_dtype = autocast_dtype(amp, device)
    world, rank = distributed.world_size(), distributed.rank()
    if config.batch_size < world:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch, shared by {world} processes: "
                         f"give at least {world}")
    out_dir = Path(out_dir)
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    vocab = Vocabulary.build((tokenize(c) for r in train_records for c in r.captions), config.min_word_count)
    model_cfg = ModelConfig(vocab_size=len(vocab), feature_dim=train_features.size(1), **(model_config or {}))
    model = CaptionDecoder(model_cfg).to(device)
    average = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    if rank > 0:  # same initial weights everywhere, but each rank its own dropout masks
        torch.manual_seed(_rank_seed(config.seed, rank))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    data = encode_split(train_records, train_features.float(), vocab, config.max_caption_length)
    steps_per_epoch = math.ceil(len(data.lengths) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    run_info = {"train_config": to_dict(config), "seed": config.seed, "data_fingerprint": data_fingerprint,
                "train_images": len(train_records), "train_captions": len(data.lengths),
                "parameters": count_parameters(model), "world_size": world, "device": device.type, "amp": amp}
    history: list[dict[str, Any]] = []
    start_epoch, best_cider, bad_epochs = 1, -1.0, 0

    last_path = out_dir / LAST
    found = distributed.all_gather_object(resume and last_path.exists())
    if len(set(found)) > 1:
        missing = [k for k, seen in enumerate(found) if not seen]
        raise CheckpointError(f"{last_path}: rank(s) {missing} cannot see it; with several machines, --out "
                              "must be a folder that every machine shares")
    if found[0]:
        tensors, metadata = read_raw(last_path)
        state = json.loads(metadata.get("training_state", "null") or "null")
        if state is None:
            raise CheckpointError(f"{last_path}: not a training-state checkpoint (no 'training_state')")
        saved = json.loads(metadata["info"])
        if saved.get("train_config") != run_info["train_config"] or json.loads(metadata["config"]) != to_dict(model_cfg):
            raise CheckpointError(f"{last_path}: the run was started with other settings; resume it with the "
                                  "same settings, or use a new --out folder")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _restore_optimizer(optimizer, tensors)
        if average is not None:
            average.load(tensors, state["ema_updates"])
        history, best_cider, bad_epochs = state["history"], state["best_cider"], state["bad_epochs"]
        start_epoch = state["epoch"] + 1
        if state.get("grad_scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["grad_scaler"])
        restored = distributed.all_gather_object(_restore_rng(tensors, device, config.seed, state["epoch"]))
        distributed.print0(f"resuming {out_dir} after epoch {state['epoch']} (best val CIDEr-D {best_cider:.4f})")
        if not all(restored):
            distributed.print0(f"note: the run was saved by {saved.get('world_size', 1)} process(es); the dropout "
                               "random state of the new ranks is reseeded, so the result differs slightly from "
                               "an uninterrupted run")
    elif resume:
        distributed.print0(f"nothing to resume in {out_dir}: starting a new run")

    # The forward must go through the wrapper: that is what arms DDP's gradient all-reduce for the step.
    # The hand-written LSTM loop reads the nn.LSTM weights as attributes, so every parameter still gets
    # a gradient each step and DDP needs no find_unused_parameters.
    train_module: torch.nn.Module = model
    if world > 1:
        train_module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)

    distributed.print0(
        f"training {count_parameters(model) / 1e6:.2f}M parameters on {len(data.lengths)} captions of "
        f"{len(train_records)} images; vocabulary {len(vocab)} words; {steps_per_epoch} steps per epoch"
        + (f" of {config.batch_size} captions, {world} processes" if world > 1 else "")
        + (f"; {device}" if device.type != "cpu" else "") + (f", autocast {amp}" if amp_dtype else ""))
    for epoch in range(start_epoch, config.epochs + 1):
        if bad_epochs >= config.patience:
            break
        train_module.train()
        epoch_start = time.perf_counter()
        data_seconds = 0.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # this rank's summed token losses
        token_count = 0
        order = torch.randperm(len(data.lengths), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        bar = progress_bar(range(steps_per_epoch), desc=f"epoch {epoch}", enabled=progress and rank == 0)
        for step_in_epoch in bar:
            step = (epoch - 1) * steps_per_epoch + step_in_epoch
            lr = learning_rate(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            fetch_start = time.perf_counter()
            global_batch = order[step_in_epoch * config.batch_size:(step_in_epoch + 1) * config.batch_size]
            global_tokens = int((data.lengths[global_batch] - 1).sum())
            local_batch = global_batch[rank::world]
            # loss = (this rank's token-loss sum) * W / global tokens; DDP's mean over ranks makes it sum/tokens
            weight = world / global_tokens
            if len(local_batch) == 0:  # a last batch smaller than W: still take part in the all-reduce
                local_batch, weight = global_batch[:1], 0.0
            features, tokens, lengths = data.batch(local_batch)
            features, tokens = features.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
            data_seconds += time.perf_counter() - fetch_start
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits, targets = train_module(features, tokens, lengths)
            token_losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum",
                                                             label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(token_losses * weight).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if average is not None:
                average.update(model)
            if weight:
                loss_sum += token_losses.detach()
                token_count += targets.numel()
            if progress and rank == 0 and step_in_epoch % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / max(1, token_count):.3f}")
        total_loss, total_tokens = distributed.all_reduce_sum([loss_sum.item(), token_count], device)
        train_seconds = time.perf_counter() - epoch_start
        val_start = time.perf_counter()
        limit = config.val_max_images or len(val_records)
        scored = average.model if average is not None else model  # what is validated, selected and saved
        val_scores = validate(scored, vocab, val_records[:limit], val_features[:limit], config)
        # with a weight average, the raw weights are scored too, to see what the average brings
        raw_scores = validate(model, vocab, val_records[:limit], val_features[:limit], config) if average else None
        entry = {"epoch": epoch, "train_loss": total_loss / total_tokens, "lr": lr, "val": val_scores,
                 "train_seconds": round(train_seconds, 2), "val_seconds": round(time.perf_counter() - val_start, 2),
                 "captions_per_second": round(len(data.lengths) / train_seconds, 1),
                 "data_wait_share": round(data_seconds / train_seconds, 4)}
        if raw_scores is not None:
            entry["val_raw"] = raw_scores
        history.append(entry)
        improved = val_scores["CIDEr-D"] > best_cider
        best_cider, bad_epochs = (val_scores["CIDEr-D"], 0) if improved else (best_cider, bad_epochs + 1)
        entry["best"] = improved
        distributed.print0(
            f"epoch {epoch}: loss {entry['train_loss']:.3f}  val BLEU-4 {val_scores['BLEU-4'] * 100:.1f}  "
            f"CIDEr-D {val_scores['CIDEr-D'] * 100:.1f}{'  (best)' if improved else ''}  "
            + (f"(raw weights {entry['val_raw']['BLEU-4'] * 100:.1f} / {entry['val_raw']['CIDEr-D'] * 100:.1f})  "
               if average is not None else "")
            + f"{train_seconds:.0f}s train, {entry['val_seconds']:.0f}s val")
        rng_states = distributed.all_gather_object(_rng_state(device))
        if distributed.is_main():
            info = {**run_info, "epoch": epoch, "val_metrics": val_scores, "val_decode": to_dict(config.val_decode)}
            if improved:
                save_checkpoint(out_dir / BEST, scored, vocab, encoder or {}, info)
            training_state = {"epoch": epoch, "history": history, "best_cider": best_cider, "bad_epochs": bad_epochs,
                              "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                              "ema_updates": average.updates if average is not None else None}
            save_checkpoint(out_dir / LAST, model, vocab, encoder or {}, info,
                            extra_tensors={**_optimizer_tensors(optimizer), **_rng_tensors(rng_states),
                                           **(average.tensors() if average is not None else {})},
                            extra_metadata={"training_state": training_state})
            write_text_atomic(out_dir / LOG, "".join(json.dumps(h) + "\n" for h in history))
            _plot_curves(history, out_dir / CURVES)
        distributed.barrier()  # the checkpoint is on disk before any rank goes on (or is stopped)
        if on_epoch_end is not None:
            on_epoch_end(entry)
    return out_dir / BEST


def with_overrides(config: TrainConfig, **overrides: Any) -> TrainConfig:
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def split_with_features(dataset: Any, cache: Any, split: str) -> tuple[list[CaptionRecord], Tensor]:
    """Records of one split that have a cached feature, and those features (rows in record order).

    Images missing from the cache (e.g. unreadable when the cache was built) are reported, not hidden.
    """
    records = dataset.split(split)
    kept = [r for r in records if r.image_id in cache]
    if len(kept) < len(records):
        missing = [r.image_id for r in records if r.image_id not in cache]
        distributed.print0(f"warning: {len(missing)} {split} images have no cached feature and are left out "
              f"(first: {missing[:3]}); run `captioner features` over them first")
    if not kept:
        raise ValueError(f"no {split} images of the dataset are in the feature cache; build it with "
                         "`captioner features` from the same dataset")
    return kept, cache.get_batch([r.image_id for r in kept])


def cached_splits(dataset: Any, features_dir: str | Path) -> dict[str, Any]:
    """Train and val records with their cached features, and the cache's encoder description."""
    from captioner.features import FeatureCache

    cache = FeatureCache.open(features_dir)
    train_records, train_features = split_with_features(dataset, cache, "train")
    val_records, val_features = split_with_features(dataset, cache, "val")
    encoder = {k: cache.meta[k] for k in ("encoder", "weights_hash", "preprocessing", "feature_dim")
               if k in cache.meta}
    return {"train_records": train_records, "train_features": train_features, "val_records": val_records,
            "val_features": val_features, "encoder": encoder}


def train_on_cache(dataset: Any, features_dir: str | Path, out_dir: str | Path,
                   model_config: dict[str, Any] | None = None, config: TrainConfig | None = None,
                   resume: bool = False, progress: bool = True,
                   on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
                   device: str | torch.device = "cpu", amp: str | None = None) -> Path:
    """Train on a dataset's train split with features from a cache; select on its val split."""
    return train(**cached_splits(dataset, features_dir), out_dir=out_dir, model_config=model_config,
                 config=config, resume=resume, data_fingerprint=dataset.fingerprint(), progress=progress,
                 on_epoch_end=on_epoch_end, device=device, amp=amp)
