"""Export a trained checkpoint for shipping: fp16 weights (half the size), same JSON metadata.

    python scripts/export_checkpoint.py runs/flickr8k-lite0/best.safetensors checkpoints/flickr8k-lite0/model.safetensors
"""

from __future__ import annotations

import argparse

import torch

from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.encoders import DEFAULT_ENCODER, get_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("target")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.source)
    encoder, state = checkpoint.encoder, checkpoint.encoder_state
    if state is not None:  # a fine-tuned CNN travels along, in float16; its hash is that of what loads back
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        loaded = get_encoder(encoder.get("encoder", DEFAULT_ENCODER), weights=state, fuse_batchnorm=False)
        encoder = {**encoder, "weights_hash": loaded.weights_hash}
    path = save_checkpoint(args.target, checkpoint.model, checkpoint.vocab, encoder,
                           {**checkpoint.info, "exported_from": str(args.source)}, dtype=torch.float16,
                           encoder_state=state)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
