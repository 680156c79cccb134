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

The decoder is unchanged; the memory is data the user builds from their own training split with
`captioner memory` (it is never shipped: it holds the dataset's captions). It must come from the same
CNN as the checkpoint (checked by weights hash), and an evaluation refuses a memory that holds images of
the split it scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from captioner.checkpoint import atomic_save, read_raw
from captioner.config import RerankConfig
from captioner.metrics.cider import CiderD
from captioner.text import tokenize

MEMORY_FORMAT = "captioner-memory"
MEMORY_VERSION = 1


class CaptionMemoryError(ValueError):
    """A caption memory that cannot be used (bad file, other CNN, overlap with the scored split)."""


class CaptionMemory:
    """Unit-length CNN features of captioned images with their captions, and the CIDEr-D scorer over them."""

    def __init__(self, image_ids: list[str], features: Tensor, captions: list[list[str]], encoder: dict[str, Any]):
        if not image_ids:
            raise CaptionMemoryError("a caption memory needs at least one image")
        if len(image_ids) != features.size(0) or len(image_ids) != len(captions):
            raise CaptionMemoryError(f"caption memory: {len(image_ids)} image ids, {features.size(0)} feature rows and "
                               f"{len(captions)} caption lists; they must match")
        empty = [image_id for image_id, texts in zip(image_ids, captions, strict=True) if not texts]
        if empty:
            raise CaptionMemoryError(f"caption memory: image {empty[0]} has no captions ({len(empty)} such images)")
        self.image_ids = list(image_ids)
        self.features = torch.nn.functional.normalize(features.float(), dim=1)
        self.captions = [list(texts) for texts in captions]
        self.encoder = dict(encoder)
        self._scorer = None

    @classmethod
    def build(cls, records: list[Any], features: Tensor, encoder: dict[str, Any]) -> CaptionMemory:
        """From caption records (image_id, captions) and one feature row per record."""
        return cls([r.image_id for r in records], features, [list(r.captions) for r in records],
                   {k: encoder[k] for k in ("encoder", "weights_hash") if k in encoder})

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def scorer(self):
        """CIDEr-D with document frequencies from the memory's captions (built on first use)."""
        if self._scorer is None:
            self._scorer = CiderD([[tokenize(text) for text in texts] for texts in self.captions])
        return self._scorer

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        metadata = {"format": MEMORY_FORMAT, "format_version": str(MEMORY_VERSION),
                    "encoder": json.dumps(self.encoder), "image_ids": json.dumps(self.image_ids),
                    "captions": json.dumps(self.captions)}
        atomic_save({"features": self.features.half().contiguous()}, metadata, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CaptionMemory:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no caption memory there; build one with `captioner memory`")
        tensors, metadata = read_raw(path)
        if metadata.get("format") != MEMORY_FORMAT:
            raise CaptionMemoryError(f"{path}: not a caption memory (made by `captioner memory`)")
        if int(metadata.get("format_version", "0")) > MEMORY_VERSION:
            raise CaptionMemoryError(f"{path}: caption memory format {metadata['format_version']} is newer than this "
                               "captioner understands; upgrade captioner")
        try:
            fields = {key: json.loads(metadata[key]) for key in ("encoder", "image_ids", "captions")}
            features = tensors["features"]
        except (KeyError, json.JSONDecodeError) as error:
            raise CaptionMemoryError(f"{path}: damaged caption memory ({error!r}); build it again") from None
        return cls(fields["image_ids"], features, fields["captions"], fields["encoder"])

    def check_encoder(self, encoder: dict[str, Any], owner: str) -> None:
        """Refuse a memory whose features come from another CNN than `owner`'s (a checkpoint's encoder entry)."""
        mine, theirs = self.encoder.get("weights_hash"), encoder.get("weights_hash")
        if self.encoder.get("encoder") != encoder.get("encoder") or (mine and theirs and mine != theirs):
            raise CaptionMemoryError(f"{owner}: its CNN is {encoder.get('encoder')} with weights {theirs}, but the caption "
                               f"memory was built with {self.encoder.get('encoder')} weights {mine}; build the "
                               f"memory with `captioner memory --checkpoint` for this checkpoint")

    def check_disjoint(self, image_ids: list[str], split: str) -> None:
        """Refuse to score images whose own captions are in the memory (they would vote for themselves)."""
        inside = set(self.image_ids).intersection(image_ids)
        if inside:
            raise CaptionMemoryError(f"the caption memory holds {len(inside)} images of the {split} split (e.g. "
                               f"{sorted(inside)[0]}): their own references would choose their captions; build "
                               "the memory from the training split only")

    def neighbours(self, features: Tensor, k: int) -> Tensor:
        """Indices (B, k) of the k memory images nearest to each query feature (cosine), nearest first."""
        if features.dim() != 2 or features.size(1) != self.features.size(1):
            raise CaptionMemoryError(f"the caption memory holds {self.features.size(1)}-dim features, but the query "
                                     f"features have shape {tuple(features.shape)}; build the memory with this CNN")
        queries = torch.nn.functional.normalize(features.float().to(self.features.device), dim=1)
        return (queries @ self.features.T).topk(min(k, len(self)), dim=1).indices

    def consensus(self, candidates: list[list[str]], neighbours: list[int]) -> np.ndarray:
        """CIDEr-D of each candidate (tokenised) against the neighbour images' references pooled together."""
        return self.scorer.score_pooled(candidates, neighbours)


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
    `consensus` attribute is set when it has one (`inference.Caption` does).
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
