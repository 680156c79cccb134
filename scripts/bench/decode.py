"""Decoding speed: captions/s for greedy, beam 3 and beam 5 at batch 1, 32 and 128, side by side with a
per-image beam-search loop (one image at a time, its beams batched: the popular tutorials' approach).

    python scripts/bench/decode.py --checkpoint checkpoints/flickr8k-lite0 --features runs/features-flickr8k-lite0

Uses the first 128 cached test features (random features when --features is not given). Targets:
batched beam 5 >= 5x the per-image loop at batch >= 32; beam 5 <= 3x greedy per caption.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from captioner.checkpoint import load_checkpoint
from captioner.config import DecodeConfig
from captioner.decoding import decode


def captions_per_second(model, features: torch.Tensor, config: DecodeConfig, batch_size: int, vocab,
                        repeats: int) -> float:
    suppress = (vocab.pad_id, vocab.start_id, vocab.unk_id)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for offset in range(0, features.size(0), batch_size):
            decode(model, features[offset:offset + batch_size], config, vocab.start_id, vocab.end_id, suppress)
        best = min(best, time.perf_counter() - start)
    return features.size(0) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/flickr8k-cocotext-lite0")
    parser.add_argument("--features", default=None, help="a feature cache (its first 128 rows are used)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    checkpoint = load_checkpoint(args.checkpoint)
    model, vocab = checkpoint.model, checkpoint.vocab
    if args.features:
        from captioner.features import FeatureCache

        cache = FeatureCache.open(args.features)
        features = cache.get_batch(list(cache.ids)[: args.images])
    else:
        features = torch.randn(args.images, model.config.feature_dim).abs()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; vocabulary {len(vocab)}, {features.size(0)} images, max length 20")

    rows: dict[str, dict[int, float]] = {}
    for name, config in (("greedy", DecodeConfig(strategy="greedy")),
                         ("beam 3", DecodeConfig(strategy="beam", beam_size=3)),
                         ("beam 5", DecodeConfig(strategy="beam", beam_size=5))):
        rows[name] = {batch: captions_per_second(model, features, config, batch, vocab, args.repeats)
                      for batch in (1, 32, 128)}
    print(f"{'captions/s':<24}{'batch 1':>10}{'batch 32':>10}{'batch 128':>10}")
    for name, by_batch in rows.items():
        print(f"{name:<24}" + "".join(f"{by_batch[b]:10.1f}" for b in (1, 32, 128)))
    loop = rows["beam 5"][1]  # one image at a time: exactly the per-image loop
    print(f"\nper-image beam-5 loop: {loop:.1f} captions/s")
    for batch in (32, 128):
        print(f"batched beam 5 at batch {batch}: {rows['beam 5'][batch] / loop:.1f}x the per-image loop (target >= 5x)")
    for batch in (32, 128):
        print(f"beam 5 cost per caption at batch {batch}: {rows['greedy'][batch] / rows['beam 5'][batch]:.2f}x greedy "
              "(target <= 3x)")


if __name__ == "__main__":
    main()
