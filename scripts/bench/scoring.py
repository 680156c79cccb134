"""Scoring speed: `compute_scores` (BLEU-1..4, CIDEr-D, ROUGE-L) on 1,000 images, and the SCST reward
(`CiderD(corpus).score_images`, the one CIDEr-D engine with fixed document frequencies) on 5,000 hypotheses against a 1,000-image corpus.

    python scripts/bench/scoring.py [--repeats 3]

Random captions over a 300-word vocabulary (5 references of 8-16 words per image), so no data is needed;
each figure is the fastest of --repeats runs, all runs printed. Targets (once wall-clock assertions in the
unit tests): compute_scores under 2 s for 1,000 images; the reward under 3 s for 5,000 hypotheses.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from collections.abc import Callable

from captioner.metrics import CiderD, compute_scores


def fastest(run: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return min(seconds), seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest counts")
    args = parser.parse_args(argv)

    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    refs = {i: [" ".join(rng.choices(words, k=rng.randint(8, 16))) for _ in range(5)] for i in range(args.images)}
    hyps = {i: " ".join(rng.choices(words, k=rng.randint(5, 14))) for i in range(args.images)}
    tokenized_refs = [[ref.split() for ref in refs[i]] for i in range(args.images)]
    sampled = [rng.choice(tokenized_refs[i // 5])[: rng.randint(1, 12)] for i in range(5 * args.images)]
    indices = [i // 5 for i in range(5 * args.images)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.images} images, 5 references each")

    best, runs = fastest(lambda: compute_scores(refs, hyps), args.repeats)
    print(f"compute_scores, {args.images} images: {best:.2f} s (runs: {', '.join(f'{s:.2f}' for s in runs)}; "
          "target < 2 s for 1,000)")
    scorer = CiderD(tokenized_refs)
    best, runs = fastest(lambda: scorer.score_images(sampled, indices), args.repeats)
    print(f"CiderD(corpus).score_images, {len(sampled)} hypotheses: {best:.2f} s "
          f"(runs: {', '.join(f'{s:.2f}' for s in runs)}; target < 3 s for 5,000)")


if __name__ == "__main__":
    main()
