#!/usr/bin/env bash
# Train the shipped Flickr8k model from scratch on this machine's CPU:
#   1. cache the CNN's features for every image (once; resumable),
#   2. train the decoder with cross-entropy on the train split, keeping the best epoch by val CIDEr-D,
#   3. with SCST_EPOCHS > 0, fine-tune that model with self-critical training (reward CIDEr-D), again
#      keeping the best epoch by val CIDEr-D (epoch 0, the starting model, competes too),
#   4. with FINETUNE_EPOCHS > 0 (default 2), fine-tune the CNN together with that decoder on the images
#      (`captioner train --objective finetune`), kept only if an epoch beats the starting model on val CIDEr-D (else its
#      best.safetensors is that starting model),
#   5. with TEXT_CORPUS (default ../shared/data/coco-text when it exists; "" skips it) and TEXT_EPOCHS > 0,
#      teach that model the words and sentences of everyday photos from captions without photos: cache the
#      features of its own (fine-tuned) CNN, then continue cross-entropy training from it (`--init-from`)
#      on the Flickr8k pairs plus the text, each caption with a pseudo image vector for the concepts it
#      names (`captioner train --text-corpus`); the vocabulary grows to the text's words,
#   6. copy the best checkpoint (fp16 weights, with its CNN when fine-tuned) into checkpoints/flickr8k-cocotext-<encoder>/
#      (checkpoints/flickr8k-<encoder>/ without the text stage),
#   7. build a caption memory of the training images for consensus re-ranking (`--memory`), beside the run
#      (it holds the dataset's captions, so it stays out of checkpoints/); MEMORY=0 skips it.
# Usage: bash scripts/train_flickr8k.sh [FLICKR8K_DIR] [RUN_DIR] [extra `captioner train` arguments...]
# Environment: ENCODER (efficientnet_lite0), FEATURES (cache folder), SCST_EPOCHS (0), SCST_ARGS,
# FINETUNE_EPOCHS (2), FINETUNE_ARGS, TEXT_CORPUS, TEXT_EPOCHS (3), TEXT_LR (1e-3), TEXT_ARGS, OUT_CHECKPOINT, MEMORY (1).
# Every stage resumes where it stopped when the script is run again.
set -euo pipefail
data=${1:-../shared/data/flickr8k}
run=${2:-runs/flickr8k-lite0}
encoder=${ENCODER:-efficientnet_lite0}
short=${encoder#efficientnet_}
features=${FEATURES:-runs/features-flickr8k-$short}

captioner features --data "$data" --encoder "$encoder" --out "$features" --resume
captioner train --data "$data" --features "$features" --out "$run" --resume "${@:3}"
best="$run/best.safetensors"
if [ "${SCST_EPOCHS:-0}" -gt 0 ]; then
  # shellcheck disable=SC2086  # SCST_ARGS is a list of flags
  captioner train --objective scst --init-from "$best" --data "$data" --features "$features" --out "$run-scst" \
      --resume \
      --epochs "$SCST_EPOCHS" ${SCST_ARGS:-}
  best="$run-scst/best.safetensors"
fi
if [ "${FINETUNE_EPOCHS:-2}" -gt 0 ]; then
  # shellcheck disable=SC2086  # FINETUNE_ARGS is a list of flags
  captioner train --objective finetune --init-from "$best" --data "$data" --out "$run-finetune" --resume \
      --epochs "${FINETUNE_EPOCHS:-2}" ${FINETUNE_ARGS:-}
  if [ -f "$run-finetune/best.safetensors" ]; then best="$run-finetune/best.safetensors"; fi
fi
text_corpus=${TEXT_CORPUS-$(dirname "$data")/coco-text}
if [ -z "${TEXT_CORPUS+set}" ] && [ ! -e "$text_corpus" ]; then text_corpus=""; fi  # the default, when absent
if [ -n "$text_corpus" ] && [ "${TEXT_EPOCHS:-3}" -gt 0 ]; then
  captioner features --data "$data" --checkpoint "$best" --out "$run-features-$short-own" --resume
  # shellcheck disable=SC2086  # TEXT_ARGS is a list of flags
  captioner train --init-from "$best" --text-corpus "$text_corpus" --data "$data" \
      --features "$run-features-$short-own" --out "$run-text" --resume --epochs "${TEXT_EPOCHS:-3}" \
      --lr "${TEXT_LR:-1e-3}" --seed 1 ${TEXT_ARGS:-}
  best="$run-text/best.safetensors"
  name=flickr8k-cocotext-$short
else
  name=flickr8k-$short
fi
out_checkpoint=${OUT_CHECKPOINT:-checkpoints/$name/model.safetensors}
python scripts/export_checkpoint.py "$best" "$out_checkpoint" --overwrite
if [ "${MEMORY:-1}" != 0 ]; then
  captioner memory --data "$data" --checkpoint "$out_checkpoint" --out "$run-memory.safetensors" --overwrite
  echo "re-rank with it: captioner caption PHOTOS --checkpoint $out_checkpoint --memory $run-memory.safetensors"
fi
