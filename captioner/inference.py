"""Image features -> caption strings, shared by training validation, evaluation and every door."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from captioner.config import DecodeConfig
from captioner.decoding import decode
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary

if TYPE_CHECKING:
    from captioner.rerank import ConsensusReranker


@dataclass
class Caption:
    text: str
    log_prob: float
    score: float
    finished: bool
    consensus: float | None = None  # set by consensus re-ranking: mean CIDEr-D against the neighbours' captions


def decode_features(model: CaptionDecoder, vocab: Vocabulary, features: Tensor, config: DecodeConfig,
                    batch_size: int = 250, generator: torch.Generator | None = None,
                    reranker: ConsensusReranker | None = None) -> list[list[Caption]]:
    """Caption every row of `features` (N, D); returns n-best Captions per row, best first.

    With a `reranker` (beam search only), the beam writes `reranker.config.candidates` captions per image
    and they come back in consensus order (`captioner.rerank`), `config.n_best` of them."""
    if reranker is not None:
        candidates = decode_features(model, vocab, features, reranker.config.decode_config(config), batch_size)
        return reranker.rerank(features, candidates, config.n_best)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    suppress = (vocab.pad_id, vocab.start_id, vocab.unk_id)
    results: list[list[Caption]] = []
    try:
        for start in range(0, features.size(0), batch_size):
            chunk = features[start:start + batch_size].to(device=device, dtype=torch.float32)
            hypotheses = decode(model, chunk, config, vocab.start_id, vocab.end_id,
                                suppress_ids=suppress, generator=generator)
            results.extend([Caption(" ".join(vocab.decode(h.tokens)), h.log_prob, h.score, h.finished)
                            for h in image_hypotheses] for image_hypotheses in hypotheses)
    finally:
        model.train(was_training)
    return results
