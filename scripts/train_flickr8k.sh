#!/usr/bin/env bash
# Train the shipped Flickr8k model from scratch on this machine's CPU:
#   1. cache EfficientNet-Lite0 features for every image (once; resumable),
#   2. train the decoder on the train split, selecting the best epoch by val CIDEr-D,
#   3. copy the best checkpoint (fp16 weights) into checkpoints/flickr8k-lite0/.
# Usage: bash scripts/train_flickr8k.sh [FLICKR8K_DIR] [RUN_DIR]
set -euo pipefail
data=${1:-../shared/data/flickr8k}
run=${2:-runs/flickr8k-lite0}
features=${FEATURES:-runs/features-flickr8k-lite0}

captioner features --data "$data" --encoder efficientnet_lite0 --out "$features"
captioner train --data "$data" --features "$features" --out "$run" --resume "${@:3}"
python scripts/export_checkpoint.py "$run/best.safetensors" checkpoints/flickr8k-lite0/model.safetensors
