"""The caption memory of consensus re-ranking: CNN features of captioned training images with their captions.

`captioner memory` builds it (`build_memory`) from the user's own training split (it is never shipped: it
holds the dataset's captions); `captioner.decoding.rerank` reads it. It must come from the same CNN as the
checkpoint it serves (checked by weights hash), and an evaluation refuses a memory that holds images of
the split it scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from captioner.checkpoint import Checkpoint, atomic_save, read_raw
from captioner.encoders.identity import check_same_cnn
from captioner.features.records import record_features
from captioner.images import DEFAULT_MAX_PIXELS
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
        check_same_cnn(self.encoder, encoder, owner, "the caption memory was built with", "its CNN is",
                       "build the memory with `captioner memory --checkpoint` for this checkpoint", CaptionMemoryError)

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


def build_memory(dataset: Any, split: str, checkpoint: Checkpoint, features_dirs: list[str | Path], batch_size: int,
                 device: torch.device, max_pixels: int = DEFAULT_MAX_PIXELS) -> CaptionMemory:
    """A caption memory of one split's images (features from a matching cache, else the checkpoint's CNN)."""
    records = dataset.split(split)
    if not records:
        raise ValueError(f"the dataset has no {split!r} images to build a caption memory from")
    records, features, problems = record_features(records, checkpoint.encoder, features_dirs, batch_size,
                                                  device, checkpoint.encoder_state, max_pixels)
    for problem in problems:
        print(f"warning: left out of the memory: {problem}")
    return CaptionMemory.build(records, features, checkpoint.encoder)
