"""Experiment: fine-tune the CNN together with a trained decoder, scored on val after every epoch.

    python scripts/try_finetune_encoder.py checkpoints/flickr8k-lite0 --out runs/finetune-lite0

Starts from a trained checkpoint (decoder) and the packaged ImageNet weights of its encoder; trains both
with teacher forcing on the Flickr8k train images (each step: a batch of images through the CNN, all five
captions of each image through the decoder; random horizontal flips; BatchNorm statistics frozen), with
separate learning rates for the CNN and the decoder. After every epoch (and once before training) the val
images go through the current CNN and are captioned with beam 3, length penalty 0.5, the shipped
decoding; val BLEU-4 and CIDEr-D are printed and logged to OUT/log.jsonl. The best epoch is saved as
OUT/best.safetensors, the final one as OUT/last.safetensors: the decoder as `model.*` and the fine-tuned
CNN as `encoder.*` (both float16; the encoder entry's weights_hash is that of the saved CNN numbers),
plain safetensors, which `Captioner.from_pretrained`, `captioner caption` and `captioner evaluate` load with
their CNN. Feature caches of the packaged weights do not fit such a checkpoint (its hash differs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.config import DecodeConfig
from captioner.data import load_dataset
from captioner.encoder import Encoder, get_encoder_spec, state_dict_hash
from captioner.features import image_loader
from captioner.inference import decode_features
from captioner.metrics import compute_scores
from captioner.training import encode_split


def val_scores(cnn: Encoder, decoder, vocab, records, batch_size: int) -> dict[str, float]:
    cnn.model.eval()
    rows = []
    with torch.inference_mode():
        for batch in image_loader([r.image_path for r in records], cnn, batch_size=batch_size):
            if batch.failures:
                raise SystemExit(f"val images failed to load: {batch.failures}")
            rows.append(cnn.model(batch.images))
    captions = decode_features(decoder, vocab, torch.cat(rows), DecodeConfig(strategy="beam", beam_size=3))
    scores = compute_scores({r.image_id: r.captions for r in records},
                            {r.image_id: c[0].text for r, c in zip(records, captions, strict=True)})
    return {"BLEU-4": scores["BLEU-4"], "CIDEr-D": scores["CIDEr-D"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default=os.environ.get("CAPTIONER_FLICKR8K", "../shared/data/flickr8k"))
    parser.add_argument("--images", default=None, help="image folder, when not beside the annotations")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-images", type=int, default=16, help="images per step (each with all its captions)")
    parser.add_argument("--encoder-lr", type=float, default=2e-5)
    parser.add_argument("--decoder-lr", type=float, default=5e-5)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--no-flip", action="store_true")
    parser.add_argument("--val-images", type=int, default=None, help="score only the first N val images")
    parser.add_argument("--train-images", type=int, default=None, help="train on the first N images only (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(args.checkpoint)
    decoder, vocab = checkpoint.model, checkpoint.vocab
    spec = get_encoder_spec(checkpoint.encoder.get("encoder", "efficientnet_lite0"))
    model = spec.build()  # packaged ImageNet weights, BatchNorm not folded
    start_hash = state_dict_hash(model.state_dict())
    if start_hash != checkpoint.encoder.get("weights_hash"):
        raise SystemExit(f"the packaged {spec.name} weights hash to {start_hash}, the checkpoint was trained on "
                         f"{checkpoint.encoder.get('weights_hash')}")
    model.requires_grad_(True)
    cnn = Encoder(spec, model, start_hash, "fine-tuned")

    dataset = load_dataset(args.data, images_dir=args.images)
    train_records = dataset.split("train")[:args.train_images]
    val_records = dataset.split("val")[:args.val_images]
    captions = encode_split(train_records, torch.zeros(len(train_records), 1), vocab, 30)
    captions_of = [[] for _ in train_records]
    for caption, row in enumerate(captions.image_rows.tolist()):
        captions_of[row].append(caption)

    optimizer = torch.optim.AdamW([
        {"params": list(model.parameters()), "lr": args.encoder_lr, "base_lr": args.encoder_lr},
        {"params": list(decoder.parameters()), "lr": args.decoder_lr, "base_lr": args.decoder_lr},
    ], weight_decay=1e-2)
    steps_per_epoch = math.ceil(len(train_records) / args.batch_images)
    total_steps = steps_per_epoch * args.epochs

    print(f"fine-tuning {spec.name} and the decoder of {args.checkpoint} on {len(train_records)} images; "
          f"{torch.get_num_threads()} threads")
    history = []
    best = val_scores(cnn, decoder, vocab, val_records, 64)
    print(f"epoch 0 (start): val BLEU-4 {best['BLEU-4'] * 100:.1f}  CIDEr-D {best['CIDEr-D'] * 100:.1f}", flush=True)
    history.append({"epoch": 0, "val": best})
    step = 0
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(len(train_records), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        paths = [train_records[i].image_path for i in order.tolist()]
        loss_sum, token_sum = 0.0, 0
        for batch in image_loader(paths, cnn, batch_size=args.batch_images):
            if not batch.indices:
                continue
            for group in optimizer.param_groups:  # linear warm-up, cosine decay to 0
                warm = min(1.0, (step + 1) / args.warmup_steps)
                group["lr"] = group["base_lr"] * warm * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            model.eval()  # BatchNorm statistics stay as trained on ImageNet; gradients still flow
            decoder.train()
            images = batch.images
            if not args.no_flip:
                flip = torch.rand(len(images)) < 0.5
                images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
            features = model(images)  # (B, D)
            image_rows = [order[position].item() for position in batch.indices]
            local, chosen = [], []
            for j, row in enumerate(image_rows):
                local += [j] * len(captions_of[row])
                chosen += captions_of[row]
            chosen_t, local_t = torch.tensor(chosen), torch.tensor(local)
            lengths = captions.lengths[chosen_t]
            sort = torch.argsort(lengths, descending=True)
            chosen_t, local_t, lengths = chosen_t[sort], local_t[sort], lengths[sort]
            tokens = captions.tokens[chosen_t, :int(lengths[0])]
            logits, targets = decoder(features[local_t], tokens, lengths)
            loss = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(decoder.parameters()), 5.0)
            optimizer.step()
            loss_sum += loss.item() * len(targets)
            token_sum += len(targets)
            step += 1
            if step % 50 == 0:
                print(f"  step {step}/{total_steps}: loss {loss_sum / token_sum:.3f}, "
                      f"{time.perf_counter() - start:.0f}s", flush=True)
        train_seconds = time.perf_counter() - start
        scores = val_scores(cnn, decoder, vocab, val_records, 64)
        improved = scores["CIDEr-D"] > best["CIDEr-D"]
        history.append({"epoch": epoch, "train_loss": loss_sum / token_sum, "val": scores,
                        "train_seconds": round(train_seconds, 1), "best": improved})
        print(f"epoch {epoch}: loss {loss_sum / token_sum:.3f}  val BLEU-4 {scores['BLEU-4'] * 100:.1f}  "
              f"CIDEr-D {scores['CIDEr-D'] * 100:.1f}{'  (best)' if improved else ''}  {train_seconds:.0f}s train",
              flush=True)
        # saved in float16; the hash is that of those numbers as they load back (float32)
        state = {k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        encoder_entry = {**checkpoint.encoder, "weights_hash": state_dict_hash(state), "fine_tuned_from": start_hash}
        info = {**checkpoint.info, "fine_tune": vars(args), "val_metrics": scores, "epoch": epoch}
        for name in ["last.safetensors"] + (["best.safetensors"] if improved else []):
            save_checkpoint(out / name, decoder, vocab, encoder_entry, info, dtype=torch.float16, encoder_state=state)
        if improved:
            best = scores
        (out / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))


if __name__ == "__main__":
    main()
