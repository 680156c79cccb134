"""What the objectives train on: captions encoded once as tensors, cached features per split, and the
seeded order in which an epoch visits its examples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from captioner import distributed
from captioner.data.records import CaptionRecord
from captioner.features.cache import FeatureCache
from captioner.text import Vocabulary, tokenize


@dataclass
class CaptionTensors:
    """Every (image, caption) pair of a split, encoded once: rows of `tokens` index `features`."""

    features: Tensor  # (images, D) float32
    image_rows: Tensor  # (captions,) row of each caption's image in `features`
    tokens: Tensor  # (captions, L) <start> ... <end> <pad>...
    lengths: Tensor  # (captions,) <start> .. <end> inclusive

    def longest_first(self, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The given captions sorted longest first: their indices, tokens (cut to the longest), lengths."""
        lengths = self.lengths[indices]
        order = torch.argsort(lengths, descending=True)
        indices, lengths = indices[order], lengths[order]
        return indices, self.tokens[indices, :int(lengths[0])], lengths

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Features, tokens and lengths of the given captions, sorted longest first."""
        indices, tokens, lengths = self.longest_first(indices)
        return self.features[self.image_rows[indices]], tokens, lengths


def encode_split(records: list[CaptionRecord], features: Tensor, vocab: Vocabulary,
                 max_caption_length: int) -> CaptionTensors:
    """Encode captions of `records` (whose features are the rows of `features`, in order)."""
    image_rows, encoded = [], []
    for row, record in enumerate(records):
        for caption in record.captions:
            words = tokenize(caption)[:max_caption_length]
            if words:
                image_rows.append(row)
                encoded.append(vocab.encode(words))
    if not encoded:
        raise ValueError("no usable training captions (every caption is empty after tokenisation)")
    lengths = torch.tensor([len(ids) for ids in encoded])
    tokens = torch.full((len(encoded), int(lengths.max())), vocab.pad_id, dtype=torch.long)
    for i, ids in enumerate(encoded):
        tokens[i, :len(ids)] = torch.tensor(ids)
    return CaptionTensors(features, torch.tensor(image_rows), tokens, lengths)


def epoch_order(count: int, seed: int, epoch: int) -> Tensor:
    """The order in which epoch `epoch` visits examples 0..count-1: it depends only on (seed, epoch), so a
    resumed run and every rank of a torchrun group draw the same one."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def split_with_features(dataset: Any, cache: FeatureCache, split: str) -> tuple[list[CaptionRecord], Tensor]:
    """Records of one split that have a cached feature, and those features (rows in record order).

    Images missing from the cache (e.g. unreadable when the cache was built) are reported, not hidden.
    """
    records = dataset.split(split)
    kept = [r for r in records if r.image_id in cache]
    if len(kept) < len(records):
        missing = [r.image_id for r in records if r.image_id not in cache]
        distributed.print0(f"warning: {len(missing)} {split} images have no cached feature and are left out "
                           f"(first: {missing[:3]}); run `captioner features` over them first")
    if not kept:
        raise ValueError(f"no {split} images of the dataset are in the feature cache; build it with "
                         "`captioner features` from the same dataset")
    return kept, cache.get_batch([r.image_id for r in kept])


def cached_splits(dataset: Any, features_dir: str | Path) -> dict[str, Any]:
    """Train and val records with their cached features, and the cache's encoder description."""
    cache = FeatureCache.open(features_dir)
    train_records, train_features = split_with_features(dataset, cache, "train")
    val_records, val_features = split_with_features(dataset, cache, "val")
    encoder = {k: cache.meta[k] for k in ("encoder", "weights_hash", "preprocessing", "feature_dim")
               if k in cache.meta}
    return {"train_records": train_records, "train_features": train_features, "val_records": val_records,
            "val_features": val_features, "encoder": encoder}
