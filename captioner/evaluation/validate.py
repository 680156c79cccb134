"""Validation by real decoding: what the trainer calls after every epoch (never teacher-forced).

It depends only on decoding and metrics, so training imports neither the evaluation report nor
pycocoevalcap.
"""

from __future__ import annotations

import torch

from captioner import distributed
from captioner.config import DecodeConfig
from captioner.data.records import CaptionRecord
from captioner.decoding.captions import decode_features
from captioner.metrics.scores import score_captions
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary


def validate(model: CaptionDecoder, vocab: Vocabulary, records: list[CaptionRecord], features: torch.Tensor,
             config: DecodeConfig) -> dict[str, float]:
    """Decode the val images for real with `config` (no concepts: validation has the features, not the
    CNN's classifier) and score them: BLEU-4 and CIDEr-D.

    Under torchrun the ranks decode a share each, rank 0 scores all of them and every rank returns the
    scores, so all ranks agree on the best epoch and on stopping."""
    texts = decode_across_ranks(model, vocab, features, config)
    scores = None
    if distributed.is_main():
        all_scores = score_captions(records, texts)
        scores = {"BLEU-4": all_scores["BLEU-4"], "CIDEr-D": all_scores["CIDEr-D"]}
    return distributed.broadcast_object(scores)


def decode_across_ranks(model: CaptionDecoder, vocab: Vocabulary, features: torch.Tensor,
                        config: DecodeConfig) -> list[str]:
    """The best caption of every row of `features`, in row order, on every rank; under torchrun rank r
    decodes rows r, r+W, r+2W, ... and the shares are gathered."""
    world, rank = distributed.world_size(), distributed.rank()
    captions = decode_features(model, vocab, features[rank::world], config)
    shares = distributed.all_gather_object([c[0].text for c in captions])  # shares[k][i]: row k + i*W
    return [shares[row % world][row // world] for row in range(features.size(0))]
