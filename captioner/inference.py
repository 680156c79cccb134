"""Image features -> caption strings, shared by training validation, evaluation and every door."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from captioner.config import DecodeConfig
from captioner.decoding import decode
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary


@dataclass
class Caption:
    text: str
    log_prob: float
    score: float
    finished: bool


def decode_features(model: CaptionDecoder, vocab: Vocabulary, features: Tensor, config: DecodeConfig,
                    batch_size: int = 250, generator: torch.Generator | None = None) -> list[list[Caption]]:
    """Caption every row of `features` (N, D); returns n-best Captions per row, best first."""
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
