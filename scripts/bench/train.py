"""Training throughput: captions/s, seconds per Flickr8k epoch and the data-wait share of the decoder's
teacher-forced step (nn.LSTM), in float32 and, side by side on the same batches, under bfloat16 autocast
(`captioner train --amp bf16`; faster only on CPUs with bf16 units, skipped where oneDNN has no bf16 LSTM).

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
from captioner.train import cpu_bf16_lstm_supported, encode_split


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

    precisions = ["float32"] + (["bf16"] if cpu_bf16_lstm_supported() else [])
    if len(precisions) == 1:
        print("bf16: this CPU's oneDNN has no bfloat16 LSTM kernel (it needs AVX-512 or newer); float32 only")
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for precision in precisions:
            torch.manual_seed(0)
            model = CaptionDecoder(model_config)
            bf16 = precision == "bf16"
            measure(model, data, order, args.batch_size, 3, bf16)  # warm-up
            result = measure(model, data, order[3 * args.batch_size:], args.batch_size, args.steps, bf16)
            if precision not in best or result["captions_per_s"] > best[precision]["captions_per_s"]:
                best[precision] = result
    print(f"{'precision':<16}{'captions/s':>12}{'s/epoch':>10}{'data wait':>11}")
    for precision, result in best.items():
        epoch_seconds = len(data.lengths) / result["captions_per_s"]
        print(f"{precision:<16}{result['captions_per_s']:12.0f}{epoch_seconds:10.0f}{result['data_share'] * 100:10.1f}%")
    if "bf16" in best:
        print(f"bf16 / float32: {best['bf16']['captions_per_s'] / best['float32']['captions_per_s']:.2f}x")


if __name__ == "__main__":
    main()
