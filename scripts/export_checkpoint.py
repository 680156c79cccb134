"""Export a trained checkpoint for shipping: fp16 weights (half the size), same JSON metadata.

    python scripts/export_checkpoint.py runs/flickr8k-lite0/best.safetensors checkpoints/flickr8k-lite0/model.safetensors
"""

from __future__ import annotations

import argparse

import torch

from captioner.checkpoint import load_checkpoint, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("target")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.source)
    path = save_checkpoint(args.target, checkpoint.model, checkpoint.vocab, checkpoint.encoder,
                           {**checkpoint.info, "exported_from": str(args.source)}, dtype=torch.float16)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
