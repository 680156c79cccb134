"""Image features: the one route from image files to CNN features, and the cache that keeps them.

    loader    batches of loaded, preprocessed images; bad files become failures
    encode    THE route images -> features (`encode_images`, `encoded_batches`), float16-rounded
    cache     the cache format: FeatureCache (read), PartialCache (resumable writing), meta/fingerprint
    extract   extract_features: records -> a finished cache, resumable, sharded under torchrun
    sharded   the per-rank partial folders of a torchrun extraction and their merge
    records   features for dataset records: from a matching cache, else computed
"""

from captioner.features.cache import FeatureCache, FeatureCacheError, cache_fingerprint
from captioner.features.encode import (
    EncodedBatch,
    EncodedImages,
    encode_batch,
    encode_images,
    encoded_batches,
    feature_run_encoder,
)
from captioner.features.extract import extract_features
from captioner.features.loader import ImageBatch, ImageLoader, image_loader, jpeg_draft_size
from captioner.features.records import cached_record_features, record_features

__all__ = [
    "EncodedBatch", "EncodedImages", "FeatureCache", "FeatureCacheError", "ImageBatch", "ImageLoader",
    "cache_fingerprint", "cached_record_features", "encode_batch", "encode_images", "encoded_batches",
    "extract_features", "feature_run_encoder", "image_loader", "jpeg_draft_size", "record_features",
]
