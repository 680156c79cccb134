"""Fine-tuning the CNN together with a trained decoder (`captioner finetune`).

Starts from a trained checkpoint (its decoder, and its CNN: the checkpoint's own, or the default weights
its encoder entry names) and trains both with teacher forcing on the training images: each step sends a
batch of images through the CNN (random horizontal flips; BatchNorm statistics stay frozen) and all the
captions of each image through the decoder, with separate learning rates for the CNN and the decoder
(linear warm-up, cosine decay to 0). Before training and after every epoch the val images go through the
current CNN and are captioned with `val_decode`; the best epoch by val CIDEr-D is kept.

The run folder holds `best.safetensors` (decoder as `model.*`, CNN as `encoder.*`: a checkpoint every
command loads with its CNN), `last.safetensors` (the same plus optimizer and random state: `--resume`
continues from it, with the same result as an uninterrupted run) and `log.jsonl`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from captioner.checkpoint import CheckpointError, load_checkpoint, read_raw, save_checkpoint
from captioner.config import FinetuneConfig, to_dict
from captioner.data.records import CaptionRecord
from captioner.encoders import DEFAULT_ENCODER, Encoder, check_weights_hash, get_encoder_spec, state_dict_hash
from captioner.features import image_loader
from captioner.training import (
    BEST,
    LAST,
    LOG,
    CaptionTensors,
    _optimizer_tensors,
    _restore_optimizer,
    encode_split,
    validate,
)
from captioner.utils import progress_bar, write_text_atomic


def _val_scores(cnn: Encoder, decoder, vocab, records: list[CaptionRecord], config: FinetuneConfig) -> dict[str, float]:
    """The val images through the current CNN, then decoded and scored as `captioner train` does."""
    cnn.model.eval()
    rows = []
    with torch.inference_mode():
        for batch in image_loader([r.image_path for r in records], cnn, batch_size=64):
            if batch.failures:
                failed = ", ".join(f"{records[i].image_path} ({reason})" for i, reason in batch.failures)
                raise ValueError(f"val images failed to load: {failed}")
            rows.append(cnn.model(batch.images))
    return validate(decoder, vocab, records, torch.cat(rows), config)


def _learning_rate(base: float, step: int, total_steps: int, warmup_steps: int) -> float:
    return base * min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / total_steps))


def finetune(init_checkpoint: str | Path, train_records: list[CaptionRecord], val_records: list[CaptionRecord],
             out_dir: str | Path, config: FinetuneConfig | None = None, resume: bool = False,
             progress: bool = True, on_epoch_end=None) -> Path:
    """Fine-tune the CNN and the decoder of `init_checkpoint`; returns the best checkpoint's path.
    `on_epoch_end(entry)` is called after each epoch's files are written (tests stop runs with it)."""
    config = config or FinetuneConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    checkpoint = load_checkpoint(init_checkpoint)
    decoder, vocab = checkpoint.model, checkpoint.vocab
    spec = get_encoder_spec(checkpoint.encoder.get("encoder", DEFAULT_ENCODER))
    model = spec.build(checkpoint.encoder_state)  # BatchNorm not folded: it is trained through
    start_hash = state_dict_hash(model.state_dict())
    model.requires_grad_(True)
    cnn = Encoder(spec, model, start_hash, "fine-tuned")
    check_weights_hash(cnn, checkpoint.encoder.get("weights_hash"), str(init_checkpoint))

    train_records = train_records[:config.train_max_images]
    val_records = val_records[:config.val_max_images]
    captions = encode_split(train_records, torch.zeros(len(train_records), 1), vocab, config.max_caption_length)
    captions_of: list[list[int]] = [[] for _ in train_records]
    for caption, row in enumerate(captions.image_rows.tolist()):
        captions_of[row].append(caption)
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "lr": config.encoder_lr},
                                   {"params": list(decoder.parameters()), "lr": config.decoder_lr}],
                                  weight_decay=config.weight_decay)
    base_lrs = [config.encoder_lr, config.decoder_lr]
    steps_per_epoch = math.ceil(len(train_records) / config.batch_images)
    total_steps = steps_per_epoch * config.epochs
    run_info = {"finetune_config": to_dict(config), "init_checkpoint": str(init_checkpoint),
                "fine_tuned_from": start_hash, "train_images": len(train_records)}

    history: list[dict[str, Any]] = []
    start_epoch, best_cider = 1, -1.0
    if resume and (out / LAST).exists():
        tensors, metadata = read_raw(out / LAST)
        state = json.loads(metadata.get("training_state", "null") or "null")
        saved = json.loads(metadata["info"])
        if state is None or saved.get("finetune_config") != run_info["finetune_config"] \
                or saved.get("init_checkpoint") != run_info["init_checkpoint"]:
            raise CheckpointError(f"{out / LAST}: the run was started with other settings; resume it with the "
                                  "same settings, or use a new --out folder")
        decoder.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        model.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")})
        _restore_optimizer(optimizer, tensors)
        torch.set_rng_state(tensors["rng.torch"])
        history, best_cider, start_epoch = state["history"], state["best_cider"], state["epoch"] + 1
        print(f"resuming {out} after epoch {state['epoch']} (best val CIDEr-D {best_cider:.4f})")
    else:
        scores = _val_scores(cnn, decoder, vocab, val_records, config)
        print(f"epoch 0 (start): val BLEU-4 {scores['BLEU-4'] * 100:.1f}  CIDEr-D {scores['CIDEr-D'] * 100:.1f}")
        history.append({"epoch": 0, "val": scores})
        best_cider = scores["CIDEr-D"]

    print(f"fine-tuning {spec.name} and the decoder of {init_checkpoint} on {len(train_records)} images, "
          f"{steps_per_epoch} steps of {config.batch_images} images per epoch")
    for epoch in range(start_epoch, config.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(len(train_records), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        loss_sum, token_sum = 0.0, 0
        loader = image_loader([train_records[i].image_path for i in order.tolist()], cnn,
                              batch_size=config.batch_images)
        for step_in_epoch, batch in enumerate(progress_bar(loader, desc=f"epoch {epoch}", enabled=progress,
                                                           total=len(loader), unit="batch")):
            if not batch.indices:
                continue
            step = (epoch - 1) * steps_per_epoch + step_in_epoch
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = _learning_rate(base, step, total_steps, config.warmup_steps)
            model.eval()  # BatchNorm statistics stay as they are; gradients still flow
            decoder.train()
            images = batch.images
            if config.flip:
                flip = torch.rand(len(images)) < 0.5
                images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
            features = model(images)  # (B, D)
            loss, tokens = _caption_loss(decoder, features, [order[p].item() for p in batch.indices],
                                         captions_of, captions, config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(decoder.parameters()), config.grad_clip)
            optimizer.step()
            loss_sum += loss.item() * tokens
            token_sum += tokens
        train_seconds = time.perf_counter() - start
        scores = _val_scores(cnn, decoder, vocab, val_records, config)
        improved = scores["CIDEr-D"] > best_cider
        best_cider = max(best_cider, scores["CIDEr-D"])
        entry = {"epoch": epoch, "train_loss": loss_sum / max(1, token_sum), "val": scores,
                 "train_seconds": round(train_seconds, 1), "best": improved}
        history.append(entry)
        print(f"epoch {epoch}: loss {entry['train_loss']:.3f}  val BLEU-4 {scores['BLEU-4'] * 100:.1f}  "
              f"CIDEr-D {scores['CIDEr-D'] * 100:.1f}{'  (best)' if improved else ''}  {train_seconds:.0f}s train")
        cnn_state = model.state_dict()
        encoder_entry = {**checkpoint.encoder, "weights_hash": state_dict_hash(cnn_state), "fine_tuned_from": start_hash}
        info = {**checkpoint.info, **run_info, "epoch": epoch, "val_metrics": scores,
                "val_decode": to_dict(config.val_decode)}
        if improved:
            save_checkpoint(out / BEST, decoder, vocab, encoder_entry, info, encoder_state=cnn_state)
        save_checkpoint(out / LAST, decoder, vocab, encoder_entry, info, encoder_state=cnn_state,
                        extra_tensors={**_optimizer_tensors(optimizer), "rng.torch": torch.get_rng_state()},
                        extra_metadata={"training_state": {"epoch": epoch, "history": history,
                                                           "best_cider": best_cider}})
        write_text_atomic(out / LOG, "".join(json.dumps(h) + "\n" for h in history))
        if on_epoch_end is not None:
            on_epoch_end(entry)
    if not (out / BEST).exists():
        print("no epoch beat the starting checkpoint on val; best.safetensors was not written")
    return out / BEST


def _caption_loss(decoder, features: Tensor, image_rows: list[int], captions_of: list[list[int]],
                  captions: CaptionTensors, label_smoothing: float) -> tuple[Tensor, int]:
    """Mean teacher-forced cross-entropy of all captions of the batch's images (features[j] is the image
    of training row image_rows[j]); also the token count."""
    position = {row: j for j, row in enumerate(image_rows)}
    chosen, tokens, lengths = captions.longest_first(torch.tensor([c for row in image_rows for c in captions_of[row]]))
    images = torch.tensor([position[row] for row in captions.image_rows[chosen].tolist()])
    logits, targets = decoder(features[images], tokens, lengths)
    loss = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return loss, len(targets)
