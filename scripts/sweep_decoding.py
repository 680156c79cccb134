"""Decoding settings on the val split: beam size × length penalty (× no-repeat n-gram blocking).

    python scripts/sweep_decoding.py runs/base/best.safetensors --features runs/features-flickr8k-lite0

With --rerank, consensus re-ranking (`captioner.decoding.rerank`) with a memory of the train split instead:
candidates (the beam size) × neighbours × weight of the beam score, one beam search per candidate count.

Several checkpoints are decoded jointly as an ensemble. Prints BLEU-4, CIDEr-D and ROUGE-L (×100) and the
mean caption length for every combination, so the decoding defaults are chosen on val, never on test.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

from captioner.config import DecodeConfig
from captioner.data import load_dataset
from captioner.decoding import decode_features
from captioner.evaluation.evaluate import join_member_features
from captioner.features import record_features
from captioner.metrics import score_captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", default=os.environ.get("CAPTIONER_FLICKR8K", "../shared/data/flickr8k"))
    parser.add_argument("--features", nargs="*", default=[],
                        help="feature caches (one per encoder); none: run each checkpoint's CNN on the images")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--beam-sizes", default="1,2,3,5,7")
    parser.add_argument("--length-penalties", default="0,0.5,1")
    parser.add_argument("--no-repeat-ngrams", default="0", help="e.g. 0,3")
    parser.add_argument("--rerank", action="store_true", help="sweep consensus re-ranking (memory: train split)")
    parser.add_argument("--rerank-candidates", default="5,10,15")
    parser.add_argument("--rerank-neighbours", default="15,30,45")
    parser.add_argument("--rerank-weights", default="0,0.1")
    args = parser.parse_args()

    import torch

    from captioner.decoding.ensemble import load_decoder

    model, checkpoints = load_decoder(args.checkpoints)
    vocab = checkpoints[0].vocab
    records = load_dataset(args.data).split(args.split)
    device = torch.device("cpu")
    records, features, _ = join_member_features(records, [
        record_features(records, c.encoder, args.features, 64, device, c.encoder_state)
        for c in checkpoints])
    print(f"{len(checkpoints)} checkpoint(s) on {args.split} ({len(records)} images)")
    if args.rerank:
        sweep_rerank(args, model, checkpoints, features, records)
        return
    print(f"{'beam':>5}{'len.pen':>9}{'no-rep':>8}{'BLEU-4':>9}{'CIDEr-D':>9}{'ROUGE-L':>9}{'words':>7}{'s':>6}")
    for beam, penalty, ngram in itertools.product([int(b) for b in args.beam_sizes.split(",")],
                                                  [float(p) for p in args.length_penalties.split(",")],
                                                  [int(n) for n in args.no_repeat_ngrams.split(",")]):
        if beam == 1 and penalty != 0:
            continue  # greedy ignores the length penalty
        config = DecodeConfig(strategy="greedy" if beam == 1 else "beam", beam_size=beam, length_penalty=penalty,
                              no_repeat_ngram_size=ngram)
        start = time.perf_counter()
        captions = decode_features(model, vocab, features, config)
        seconds = time.perf_counter() - start
        scores = score_captions(records, captions)
        words = sum(len(c[0].text.split()) for c in captions) / len(captions)
        print(f"{beam:>5}{penalty:>9.1f}{ngram:>8}{scores['BLEU-4'] * 100:9.1f}{scores['CIDEr-D'] * 100:9.1f}"
              f"{scores['ROUGE-L'] * 100:9.1f}{words:7.1f}{seconds:6.1f}", flush=True)


def sweep_rerank(args, model, checkpoints, features, records) -> None:
    import torch

    from captioner.config import RerankConfig
    from captioner.decoding.memory import build_memory
    from captioner.decoding.rerank import rerank

    if len(checkpoints) > 1:
        raise SystemExit("--rerank takes one checkpoint")
    memory = build_memory(load_dataset(args.data), "train", checkpoints[0], args.features, 64, torch.device("cpu"))
    memory.check_disjoint([r.image_id for r in records], args.split)
    print(f"memory: {len(memory)} train images")
    print(f"{'cands':>6}{'len.pen':>9}{'neigh.':>8}{'weight':>8}{'BLEU-4':>9}{'CIDEr-D':>9}{'ROUGE-L':>9}{'words':>7}{'s':>6}")
    for candidates, penalty in itertools.product([int(c) for c in args.rerank_candidates.split(",")],
                                                 [float(p) for p in args.length_penalties.split(",")]):
        config = RerankConfig(candidates=candidates).decode_config(DecodeConfig(length_penalty=penalty))
        start = time.perf_counter()
        nbest = decode_features(model, checkpoints[0].vocab, features, config)
        decode_seconds = time.perf_counter() - start
        for neighbours, weight in itertools.product([int(k) for k in args.rerank_neighbours.split(",")],
                                                    [float(w) for w in args.rerank_weights.split(",")]):
            start = time.perf_counter()
            chosen = rerank(memory, features, nbest, RerankConfig(neighbours, candidates, weight))
            seconds = decode_seconds + time.perf_counter() - start
            scores = score_captions(records, chosen)
            words = sum(len(c[0].text.split()) for c in chosen) / len(chosen)
            print(f"{candidates:>6}{penalty:>9.1f}{neighbours:>8}{weight:>8.2f}{scores['BLEU-4'] * 100:9.1f}"
                  f"{scores['CIDEr-D'] * 100:9.1f}{scores['ROUGE-L'] * 100:9.1f}{words:7.1f}{seconds:6.1f}", flush=True)


if __name__ == "__main__":
    main()
