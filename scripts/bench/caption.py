"""What users feel: batch-command throughput, demo latency and memory, in one run.

    python scripts/bench/caption.py --checkpoint checkpoints/flickr8k-lite0 --images ../shared/data/flickr8k/images

1. End-to-end images/s of `captioner caption` (a subprocess, beam 3, JSONL output) on 200 Flickr8k
   images, against the bare CNN forward on the same images already decoded and preprocessed in
   memory (same batch size). Target: >= 0.8 of the bare forward.
2. The demo's single-image latency through its `predict` function (beam 3), p50 and p95 over the
   same images. Target: p50 <= 150 ms.
3. Peak RSS of the batch-command subprocess. Target: <= 1.5 GB.
4. With --memory M (a caption memory from `captioner memory`): the steady state and the demo latency
   again with consensus re-ranking (default settings), after the plain figures above.

    python scripts/bench/caption.py --startup [--runs 5]

measures start-up alone: the wall time of `captioner caption one.jpg` (a fresh process: imports, model
load, one beam-3 caption) against `python -c "import torch, PIL, numpy"`, the floor any PyTorch
captioner pays, each run --runs times alternately; prints the medians and their ratio (target <= 1.5).

The throughput figures are measured in --rounds rounds (default 3), each timing the command, the steady
state and the bare CNN one after the other, so that a slow spell of a shared machine hits both sides of a
ratio; the medians are printed, with the range of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def bare_forward_images_per_second(encoder, batches: list[torch.Tensor]) -> float:
    with torch.inference_mode():
        encoder.model(batches[0])  # warm-up
        start = time.perf_counter()
        for images in batches:
            encoder.model(images)
    return sum(len(images) for images in batches) / (time.perf_counter() - start)


def stage_seconds(captioner, paths: list[str], batch_size: int) -> dict[str, float]:
    """The batch command's three stages timed apart: loading (files to normalised batches), the CNN, and
    beam-3 decoding of the features in groups of 128 (for a re-ranking captioner: its candidate beam search
    and its consensus scores instead)."""
    from captioner.config import DecodeConfig
    from captioner.features import encode_batch, image_loader

    seconds = {"loading": 0.0, "CNN": 0.0}
    features = []
    batches = iter(image_loader(paths, captioner.encoder, batch_size=batch_size))
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        seconds["loading"] += time.perf_counter() - start
        if batch is None:
            break
        start = time.perf_counter()
        features.append(encode_batch(captioner.encoder, batch.images))
        seconds["CNN"] += time.perf_counter() - start
    features = torch.cat(features)
    if captioner.reranker is None:
        start = time.perf_counter()
        for first in range(0, len(features), 128):
            captioner.caption_features(features[first:first + 128], DecodeConfig(strategy="beam", beam_size=3))
        seconds["decoding"] = time.perf_counter() - start
    else:  # the re-ranking decode in its two parts, on the same features
        from captioner.decoding import decode_features
        from captioner.decoding.rerank import rerank

        reranker, candidates = captioner.reranker, []
        start = time.perf_counter()
        for first in range(0, len(features), 128):
            candidates += decode_features(captioner.checkpoint.model, captioner.vocab, features[first:first + 128],
                                          reranker.config.decode_config(DecodeConfig()))
        seconds["candidate beam search"] = time.perf_counter() - start
        start = time.perf_counter()
        rerank(reranker.memory, features, candidates, reranker.config)
        seconds["consensus scores"] = time.perf_counter() - start
    return seconds


def startup_seconds(runs: int, checkpoint: str) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, CPU seconds) of a bare `import torch, PIL, numpy` and of `captioner caption one.jpg`
    (one of the demo's example photos, in a temporary folder), run alternately so a slow spell hits both. CPU
    time (user + system, all threads) is printed too: on a machine shared with other jobs it moves less."""
    example = Path(__file__).resolve().parents[2] / "demo" / "examples" / "cat.jpg"
    times: dict[str, list[tuple[float, float]]] = {"imports": [], "caption": []}
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "one.jpg"
        photo.write_bytes(example.read_bytes())
        commands = {"imports": [sys.executable, "-c", "import torch, PIL, numpy"],
                    "caption": [sys.executable, "-m", "captioner", "caption", str(photo), "--checkpoint", checkpoint]}
        for _ in range(runs):
            for name, command in commands.items():
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                subprocess.run(command, check=True, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wall = time.perf_counter() - start
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                times[name].append((wall, cpu))
    return {name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
            for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/flickr8k-cocotext-lite0")
    parser.add_argument("--images", default="../shared/data/flickr8k/images")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", action="store_true",
                        help="also time the steady state with other pipeline settings, side by side")
    parser.add_argument("--memory", default=None, help="also time consensus re-ranking with this caption memory")
    parser.add_argument("--startup", action="store_true",
                        help="only time start-up: `captioner caption one.jpg` against `import torch, PIL, numpy`")
    parser.add_argument("--runs", type=int, default=5, help="--startup: runs of each command (medians printed)")
    args = parser.parse_args()
    if args.startup:
        medians = startup_seconds(args.runs, str(Path(args.checkpoint).resolve()))
        (imports, imports_cpu), (caption, caption_cpu) = medians["imports"], medians["caption"]
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, load average "
              f"{os.getloadavg()[0]:.1f}; medians of {args.runs} runs, alternating")
        print(f"   python -c 'import torch, PIL, numpy': {imports:.2f} s wall, {imports_cpu:.2f} s CPU")
        print(f"   captioner caption one.jpg (beam 3):   {caption:.2f} s wall, {caption_cpu:.2f} s CPU")
        print(f"   ratio {caption / imports:.2f} wall (target <= 1.5), {caption_cpu / imports_cpu:.2f} CPU")
        return

    from captioner.api import Captioner
    from captioner.apps.batch import BatchOptions, caption_paths
    from captioner.config import DecodeConfig
    from captioner.features import image_loader

    paths = sorted(str(p) for p in Path(args.images).iterdir())[: args.count]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {len(paths)} images, batch {args.batch_size}, beam 3")

    captioner = Captioner.from_pretrained(args.checkpoint, device="cpu")
    config = DecodeConfig(strategy="beam", beam_size=3)
    caption_paths([paths[0]], captioner, config, BatchOptions(progress=False))  # warm-up
    batches = [batch.images for batch in image_loader(paths, captioner.encoder, batch_size=args.batch_size)]
    rounds: list[dict[str, float]] = []
    peak_rss_mb = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "images"
        listing.mkdir()
        for path in paths:
            (listing / Path(path).name).symlink_to(Path(path).resolve())
        for number in range(args.rounds):
            figures = {}
            output = Path(tmp) / f"out{number}.jsonl"
            command = [sys.executable, "-m", "captioner", "caption", str(listing), "--checkpoint", args.checkpoint,
                       "--strategy", "beam", "--beam-size", "3", "--batch-size", str(args.batch_size),
                       "--output", str(output)]
            start = time.perf_counter()
            subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            figures["end_to_end"] = sum(1 for _ in open(output)) / seconds
            peak_rss_mb = max(peak_rss_mb, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)

            # The same library call as the command, with the model already loaded: the steady state of a
            # long run, where start-up (imports, model load) is paid once.
            start = time.perf_counter()
            caption_paths([str(listing)], captioner, config, BatchOptions(
                output=Path(tmp) / f"steady{number}.jsonl", batch_size=args.batch_size, progress=False))
            figures["steady"] = len(paths) / (time.perf_counter() - start)
            # the bare CNN on the same images, already decoded and normalised in memory, same batch size
            figures["bare"] = bare_forward_images_per_second(captioner.encoder, batches)
            rounds.append(figures)

        variants = {}
        if args.variants:  # each once, in this order, after the rounds above
            settings = {"decoding per CNN batch (no grouping)": {"decode_batch_size": 1},
                        "CNN batch 64": {"batch_size": 64},
                        "one loader worker process": {"num_workers": 1}}
            for number, (name, overrides) in enumerate(settings.items()):
                start = time.perf_counter()
                caption_paths([str(listing)], captioner, config, BatchOptions(
                    output=Path(tmp) / f"variant{number}.jsonl", progress=False,
                    **{"batch_size": args.batch_size, **overrides}))
                variants[name] = len(paths) / (time.perf_counter() - start)

    stages = stage_seconds(captioner, paths, args.batch_size)
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    steady_ratios = [r["steady"] / r["bare"] for r in rounds]
    end_ratios = [r["end_to_end"] / r["bare"] for r in rounds]
    print(f"\n1. batch command vs bare CNN forward (medians of {len(rounds)} rounds)")
    print(f"   end to end (process start, model load, loading, CNN, beam 3, writing): {median['end_to_end']:6.1f} images/s")
    print(f"   steady state (model loaded; loading, CNN, beam 3, writing):           {median['steady']:6.1f} images/s")
    print(f"   bare CNN forward on preprocessed in-memory images:                   {median['bare']:6.1f} images/s")
    print(f"   ratio: end to end {statistics.median(end_ratios):.2f}, steady state {statistics.median(steady_ratios):.2f} "
          f"(per round {min(steady_ratios):.2f}-{max(steady_ratios):.2f}; target >= 0.8)")
    print(f"   where the steady state's time goes, in series: loading {stages['loading']:.2f} s, CNN "
          f"{stages['CNN']:.2f} s, beam 3 {stages['decoding']:.2f} s (groups of 128) for {len(paths)} images")
    for name, rate in variants.items():
        print(f"   steady state, {name + ':':<42} {rate:6.1f} images/s ({rate / median['bare']:.2f})")

    p50, p95 = demo_latency(captioner, paths)
    print("\n2. demo predict(), one image, beam 3")
    print(f"   p50 {p50:.0f} ms, p95 {p95:.0f} ms over {len(paths[5:60])} images (target p50 <= 150 ms)")
    print("\n3. batch command memory")
    print(f"   peak RSS {peak_rss_mb:.0f} MB (target <= 1536 MB)")

    if args.memory:
        from captioner.config import RerankConfig

        start = time.perf_counter()
        reranking = Captioner.from_pretrained(args.checkpoint, device="cpu", memory=args.memory)
        load_seconds = time.perf_counter() - start
        reranking.reranker.memory.scorer  # noqa: B018 -- index the memory's captions before timing
        index_seconds = time.perf_counter() - start - load_seconds
        candidates = RerankConfig().candidates
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            caption_paths(paths, reranking, config, BatchOptions(output=Path(tmp) / "reranked.jsonl",
                                                                 batch_size=args.batch_size, progress=False))
            rate = len(paths) / (time.perf_counter() - start)
        p50, p95 = demo_latency(reranking, paths)
        split = ", ".join(f"{name} {value:.2f} s" for name, value in stage_seconds(reranking, paths, args.batch_size).items())
        print(f"\n4. consensus re-ranking ({len(reranking.reranker.memory)} memory images, beam {candidates} "
              f"candidates): load {load_seconds:.1f} s + caption index {index_seconds:.1f} s")
        print(f"   steady state {rate:6.1f} images/s (plain beam 3 above: {median['steady']:.1f}); "
              f"demo p50 {p50:.0f} ms, p95 {p95:.0f} ms")
        print(f"   stages for {len(paths)} images, in series: {split}")


def demo_latency(captioner, paths: list[str]) -> tuple[float, float]:
    """p50 and p95 (ms) of the demo's predict() on paths[5:60], one image at a time, beam 3."""
    from captioner.apps.demo import predict

    latencies = []
    for path in paths[:60]:
        start = time.perf_counter()
        predict(captioner, path, "beam", 3, 1.0, 0, 1)
        latencies.append((time.perf_counter() - start) * 1000)
    latencies = latencies[5:]  # first calls warm up the allocator
    return statistics.median(latencies), statistics.quantiles(latencies, n=20)[18]


if __name__ == "__main__":
    main()
