"""Training throughput: captions/s, seconds per Flickr8k epoch and the data-wait share, for the
hand-written LSTM loop and for nn.LSTM, measured side by side in one run on the same batches, plus the
hand loop under bfloat16 autocast (`captioner train --amp bf16`; faster only on CPUs with bf16 units).

    python scripts/bench/train.py --data ../shared/data/flickr8k --features runs/features-lite0

Without --features it uses random 1280-d features for the real Flickr8k captions (same shapes,
same cost). Prints the machine, the settings and one row per implementation.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from captioner.config import ModelConfig, TrainConfig
from captioner.data import load_dataset
from captioner.model import CaptionDecoder, count_parameters
from captioner.text import Vocabulary, tokenize
from captioner.train import encode_split


def measure(model: CaptionDecoder, data, order: torch.Tensor, batch_size: int, steps: int,
            bf16: bool = False) -> dict[str, float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    data_seconds, captions = 0.0, 0
    start = time.perf_counter()
    for step in range(steps):
        fetch = time.perf_counter()
        features, tokens, lengths = data.batch(order[step * batch_size:(step + 1) * batch_size])
        data_seconds += time.perf_counter() - fetch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, targets = model(features, tokens, lengths)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        captions += len(lengths)
    seconds = time.perf_counter() - start
    return {"captions_per_s": captions / seconds, "data_share": data_seconds / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/flickr8k")
    parser.add_argument("--features", default=None)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per implementation")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (the best round counts)")
    args = parser.parse_args()

    torch.manual_seed(0)
    dataset = load_dataset(args.data)
    records = dataset.split("train")
    if args.features:
        from captioner.features import FeatureCache

        cache = FeatureCache.open(args.features)
        records = [r for r in records if r.image_id in cache]
        features = cache.get_batch([r.image_id for r in records])
    else:
        features = torch.randn(len(records), 1280)
    config = TrainConfig()
    vocab = Vocabulary.build((tokenize(c) for r in records for c in r.captions), config.min_word_count)
    data = encode_split(records, features.float(), vocab, config.max_caption_length)
    order = torch.randperm(len(data.lengths))
    model_config = ModelConfig(vocab_size=len(vocab), feature_dim=features.size(1))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: {count_parameters(CaptionDecoder(model_config)) / 1e6:.2f}M parameters, vocabulary "
          f"{len(vocab)}, batch {args.batch_size}, {len(data.lengths)} captions per epoch")

    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for impl in ("loop", "nn", "loop-bf16"):
            torch.manual_seed(0)
            model = CaptionDecoder(model_config, lstm_impl=impl.removesuffix("-bf16"))
            bf16 = impl.endswith("bf16")
            measure(model, data, order, args.batch_size, 3, bf16)  # warm-up
            result = measure(model, data, order[3 * args.batch_size:], args.batch_size, args.steps, bf16)
            if impl not in best or result["captions_per_s"] > best[impl]["captions_per_s"]:
                best[impl] = result
    print(f"{'implementation':<16}{'captions/s':>12}{'s/epoch':>10}{'data wait':>11}")
    for impl, result in best.items():
        epoch_seconds = len(data.lengths) / result["captions_per_s"]
        name = {"loop": "hand loop", "nn": "nn.LSTM", "loop-bf16": "hand loop bf16"}[impl]
        print(f"{name:<16}{result['captions_per_s']:12.0f}{epoch_seconds:10.0f}{result['data_share'] * 100:10.1f}%")
    print(f"hand loop / nn.LSTM: {best['loop']['captions_per_s'] / best['nn']['captions_per_s']:.2f}x; "
          f"bf16 / fp32 hand loop: {best['loop-bf16']['captions_per_s'] / best['loop']['captions_per_s']:.2f}x")


if __name__ == "__main__":
    main()
