"""Features for dataset records: read from the feature cache their checkpoint's CNN made, else computed by
`encode_images`. Evaluation, the caption memory and ensembles ask here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from captioner.data.records import CaptionRecord
from captioner.encoders.identity import check_same_cnn
from captioner.encoders.registry import DEFAULT_ENCODER, checkpoint_encoder
from captioner.features.cache import FeatureCache
from captioner.features.encode import encode_images
from captioner.images import DEFAULT_MAX_PIXELS

RecordFeatures = tuple[list[CaptionRecord], torch.Tensor, list[str]]  # records kept, their features, problems


def cached_record_features(records: list[CaptionRecord], cache: FeatureCache, encoder_name: str,
                           weights_hash: str | None = None) -> RecordFeatures:
    """The records' rows of `cache`, which must come from `encoder_name` (and weights `weights_hash`)."""
    where = cache.directory
    check_same_cnn(cache.meta, {"encoder": encoder_name, "weights_hash": weights_hash}, str(where),
                   "its features come from", "the checkpoint was trained on",
                   "give the feature cache of the checkpoint's own CNN, or none to run it")
    kept = [r for r in records if r.image_id in cache]
    reasons = {entry.get("image_id"): entry.get("reason") for entry in cache.failed}
    problems = [f"{r.image_path}: " + (f"no cached feature ({reasons[r.image_id]})" if reasons.get(r.image_id)
                                       else f"not in the feature cache {where}")
                for r in records if r.image_id not in cache]
    return kept, cache.get_batch([r.image_id for r in kept]), problems


def record_features(records: list[CaptionRecord], encoder: Mapping[str, Any], features_dirs: Sequence[str | Path],
                    batch_size: int, device: torch.device,
                    encoder_state: Mapping[str, torch.Tensor] | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> RecordFeatures:
    """Features for a checkpoint's records, from the first of `features_dirs` made by its CNN (its
    `encoder` entry: name and weights hash; a cache of these very weights is preferred), else by running
    that CNN (`encoder_state`: the checkpoint's own CNN weights, when it carries them; `max_pixels`: the
    most pixels decoded per image). Returns the records
    that have features, the features, and a problem line for each record left out."""
    name = encoder.get("encoder", DEFAULT_ENCODER)
    weights_hash = encoder.get("weights_hash")
    features_dirs = list(features_dirs)
    if len(features_dirs) > 1:
        metas = {d: FeatureCache.open(d).meta for d in features_dirs}
        matching = [d for d in features_dirs if metas[d].get("encoder") == name]
        if not matching:
            raise ValueError(f"none of the feature caches {', '.join(map(str, features_dirs))} was made by {name!r}")
        # prefer the cache of these very weights (a fine-tuned CNN's, beside the packaged one's)
        same_weights = [d for d in matching if metas[d].get("weights_hash") == weights_hash]
        features_dirs = same_weights or matching
    if features_dirs:
        return cached_record_features(records, FeatureCache.open(features_dirs[0]), name, weights_hash)
    cnn = checkpoint_encoder({"encoder": name, "weights_hash": weights_hash}, "the checkpoint", encoder_state)
    encoded = encode_images([r.image_path for r in records], cnn, batch_size=batch_size, device=device,
                            max_pixels=max_pixels)
    problems = [f"{records[i].image_path}: {reason}" for i, reason in encoded.failures]
    return [records[i] for i in encoded.indices], encoded.features, problems
