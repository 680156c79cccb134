"""Test-time augmentation with a horizontal flip, on val: captions from the features of the image, of its
mirror image, and of the two averaged.

    python scripts/try_flip_tta.py checkpoints/flickr8k-lite0/model.safetensors --features CACHE

The features of the originals come from the cache (as evaluation reads them); the mirrored images go
through the checkpoint's CNN here (1,000 val images: about half a minute on 2 cores). Prints BLEU-4 and
CIDEr-D ×100 per checkpoint and variant. docs/experiments.md has the result (averaging did not help).
"""

from __future__ import annotations

import argparse
import os

import torch
from PIL import ImageOps

from captioner.checkpoint import load_checkpoint
from captioner.config import DecodeConfig
from captioner.data import load_dataset
from captioner.encoders import get_encoder
from captioner.features import FeatureCache
from captioner.images import load_image
from captioner.inference import decode_features
from captioner.metrics import compute_scores


def mirrored_features(encoder, records, batch_size: int = 50) -> torch.Tensor:
    """Features of the mirrored images, rounded through float16 as a cache stores them."""
    rows = []
    with torch.inference_mode():
        for start in range(0, len(records), batch_size):
            pixels = torch.stack([encoder.preprocess(ImageOps.mirror(load_image(r.image_path)))
                                  for r in records[start:start + batch_size]])
            rows.append(encoder(pixels).to(torch.float16).float())
    return torch.cat(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", default=os.environ.get("CAPTIONER_FLICKR8K", "../shared/data/flickr8k"))
    parser.add_argument("--features", required=True, help="the feature cache of the checkpoints' encoder")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    args = parser.parse_args()

    records = load_dataset(args.data).split(args.split)
    cache = FeatureCache.open(args.features)
    original = cache.get_batch([r.image_id for r in records])
    mirrored = mirrored_features(get_encoder(cache.meta["encoder"]), records)
    references = {r.image_id: r.captions for r in records}
    for path in args.checkpoints:
        checkpoint = load_checkpoint(path)
        model = checkpoint.model.float()
        for name, features in (("original", original), ("mirrored", mirrored),
                               ("average", (original + mirrored) / 2)):
            captions = decode_features(model, checkpoint.vocab, features, DecodeConfig())
            scores = compute_scores(references, {r.image_id: c[0].text for r, c in zip(records, captions, strict=True)})
            print(f"{path}  {name:<9} BLEU-4 {100 * scores['BLEU-4']:.1f}  CIDEr-D {100 * scores['CIDEr-D']:.1f}")


if __name__ == "__main__":
    main()
