"""Export a trained checkpoint for shipping: fp16 weights (half the size), same JSON metadata.

    python scripts/export_checkpoint.py runs/flickr8k-lite0/best.safetensors checkpoints/flickr8k-lite0/model.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from captioner.checkpoint import MODEL_FILE, CheckpointError, load_checkpoint, portable_path, save_checkpoint
from captioner.encoders import DEFAULT_ENCODER, get_encoder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a checkpoint file or a run folder (its best)")
    parser.add_argument("target")
    parser.add_argument("--overwrite", action="store_true", help="replace the target if it exists")
    args = parser.parse_args(argv)
    target = Path(args.target)
    target = target / MODEL_FILE if target.is_dir() else target
    if target.exists() and not args.overwrite:
        parser.exit(2, f"export_checkpoint.py: error: {target}: a file is already there; replace it with "
                       "--overwrite, or give another target\n")
    try:
        checkpoint = load_checkpoint(args.source)
    except CheckpointError as error:
        parser.exit(2, f"export_checkpoint.py: error: {error}\n")
    encoder, state = checkpoint.encoder, checkpoint.encoder_state
    if state is not None:  # a fine-tuned CNN travels along, in float16; its hash is that of what loads back
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        loaded = get_encoder(encoder.get("encoder", DEFAULT_ENCODER), weights=state, fuse_batchnorm=False)
        encoder = {**encoder, "weights_hash": loaded.weights_hash}
    path = save_checkpoint(target, checkpoint.model, checkpoint.vocab, encoder,
                           {**checkpoint.info, "exported_from": portable_path(checkpoint.path)}, dtype=torch.float16,
                           encoder_state=state)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
