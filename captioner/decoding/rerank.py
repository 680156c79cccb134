"""Consensus re-ranking of beam candidates with a memory of captioned training images.

Devlin et al. 2015 ("Exploring nearest neighbor approaches for image captioning"; "Language models for
image captioning: the quirks and what works") choose, among a captioner's candidates, the one that agrees
best with the captions people wrote for the most similar training images. Here:

1. beam search writes `candidates` captions for the photo (its n-best list);
2. the photo's CNN feature finds its `neighbours` nearest training images (cosine similarity) in a
   `CaptionMemory`, which holds the training images' features and their reference captions;
3. each candidate gets its consensus: its CIDEr-D against all those neighbours' references together
   (document frequencies from all the memory's captions; CIDEr-D averages over references, so with as
   many captions per image this is the mean over the neighbours), plus `model_weight` times its beam
   score (length-normalised log-prob);
4. the candidates are returned in that order, best first.

The decoder is unchanged; the memory (`captioner.decoding.memory`) is data the user builds from their own
training split with `captioner memory`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from captioner.config import RerankConfig
from captioner.decoding.memory import CaptionMemory
from captioner.text import tokenize


@dataclass
class ConsensusReranker:
    """A caption memory with its re-ranking settings: what `decode_features(..., reranker=)` takes."""

    memory: CaptionMemory
    config: RerankConfig = RerankConfig()

    def rerank(self, features: Tensor, nbest: list[list[Any]], n_best: int = 1) -> list[list[Any]]:
        return rerank(self.memory, features, nbest, self.config, n_best)


def reranker_for(memory: str | Path | CaptionMemory, encoder: dict[str, Any], owner: str,
                 config: RerankConfig | None = None) -> ConsensusReranker:
    """A reranker with `memory` (a file or a loaded memory), refused unless its features come from the
    CNN of `owner`, whose encoder entry is `encoder`."""
    if not isinstance(memory, CaptionMemory):
        memory = CaptionMemory.load(memory)
    memory.check_encoder(encoder, owner)
    return ConsensusReranker(memory, config or RerankConfig())


def rerank(memory: CaptionMemory, features: Tensor, nbest: list[list[Any]], config: RerankConfig,
           n_best: int = 1) -> list[list[Any]]:
    """Re-order each image's candidates (objects with .text and .score) by consensus; keep `n_best`.

    features: the images' CNN features (B, D), one row per n-best list. Each kept candidate's
    `consensus` attribute is set when it has one (`captioner.decoding.captions.Caption` does).
    """
    if features.size(0) != len(nbest):
        raise ValueError(f"rerank: {features.size(0)} feature rows for {len(nbest)} candidate lists")
    if not nbest:
        return []
    nearest = memory.neighbours(features, config.neighbours).tolist()
    results = []
    for candidates, neighbours in zip(nbest, nearest, strict=True):
        if not candidates:
            results.append([])
            continue
        agreement = memory.consensus([tokenize(c.text) for c in candidates], neighbours)
        total = agreement + config.model_weight * np.array([c.score for c in candidates])
        order = np.argsort(-total, kind="stable")[:n_best]
        chosen = []
        for i in order:
            candidate = candidates[int(i)]
            if hasattr(candidate, "consensus"):
                candidate = replace(candidate, consensus=float(agreement[int(i)]))
            chosen.append(candidate)
        results.append(chosen)
    return results
