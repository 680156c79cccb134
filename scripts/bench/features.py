"""Throughput of feature extraction against the bare backbone on the same images.

    python scripts/bench/features.py [--count 256] [--batch-size 64] [--num-workers 2] [--threads N]

Measures, in one process and interleaved (this machine may be shared, so each figure is the best of
--repeats runs, all runs printed):
  * extract_features: images/s of the whole pipeline (file -> decode -> preprocess -> CNN -> float16 cache
    in a temporary folder), the first `--count` images (sorted by name) of Flickr8k;
  * backbone only: images/s of the CNN forward alone on the same images, already decoded, preprocessed
    and normalised in memory, with the same batch size and memory format.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from captioner.data.records import CaptionRecord
from captioner.encoders import DEFAULT_ENCODER, get_encoder
from captioner.features import extract_features
from captioner.images import load_image

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_IMAGES = Path(os.environ.get("CAPTIONER_FLICKR8K", REPO_ROOT.parent / "shared" / "data" / "flickr8k")) / "images"


def auto(value: int | None) -> str:
    return "auto" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of images")
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader worker processes (default: extract_features' choice for the device)")
    parser.add_argument("--load-threads", type=int, default=None,
                        help="threads loading each batch (default: extract_features' choice)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--no-fuse-batchnorm", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    channels_last = not args.no_channels_last
    names = sorted(p.name for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    names = names[:args.count]
    if not names:
        raise SystemExit(f"{args.images}: no images found")
    records = [CaptionRecord(image_id=name, image_path=args.images / name, captions=[], split="train")
               for name in names]

    encoder = get_encoder(args.encoder, fuse_batchnorm=not args.no_fuse_batchnorm)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, os.cpu_count()={os.cpu_count()}, "
          f"usable cores={len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}, "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, python {platform.python_version()}")
    print(f"settings: encoder={encoder.name} (weights {encoder.weights_hash}), images={len(names)} from "
          f"{args.images}, batch_size={args.batch_size}, num_workers={auto(args.num_workers)}, "
          f"load_threads={auto(args.load_threads)}, "
          f"channels_last={channels_last}, fuse_batchnorm={not args.no_fuse_batchnorm}, repeats={args.repeats}")

    # Backbone-only input: every image decoded, resized and normalised ahead of time.
    preprocessor = encoder.preprocessor
    pixels = torch.stack([preprocessor.to_pixels(load_image(record.image_path)) for record in records])
    batches = [preprocessor.normalize(pixels[start:start + args.batch_size], channels_last=channels_last)
               for start in range(0, len(pixels), args.batch_size)]
    model = encoder.model
    with torch.inference_mode():
        model(batches[0])  # warm-up: one-off kernel selection and allocation

    def backbone_only() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                model(batch)
        return len(names) / (time.perf_counter() - start)

    def pipeline() -> float:
        with tempfile.TemporaryDirectory(prefix="bench_features_") as out_dir:
            start = time.perf_counter()
            extract_features(records, encoder, out_dir, batch_size=args.batch_size,
                             num_workers=args.num_workers, load_threads=args.load_threads, progress=False,
                             channels_last=channels_last)
            return len(names) / (time.perf_counter() - start)

    backbone_runs: list[float] = []
    pipeline_runs: list[float] = []
    for repeat in range(args.repeats):
        backbone_runs.append(backbone_only())
        pipeline_runs.append(pipeline())
        print(f"  run {repeat + 1}: backbone only {backbone_runs[-1]:6.1f} img/s, "
              f"extract_features {pipeline_runs[-1]:6.1f} img/s")

    best_backbone, best_pipeline = max(backbone_runs), max(pipeline_runs)
    print(f"backbone only (best of {args.repeats}):    {best_backbone:6.1f} images/s")
    print(f"extract_features (best of {args.repeats}): {best_pipeline:6.1f} images/s")
    print(f"ratio extract_features / backbone: best {best_pipeline / best_backbone:.3f}, "
          f"median {statistics.median(pipeline_runs) / statistics.median(backbone_runs):.3f} (target >= 0.85)")


if __name__ == "__main__":
    main()
