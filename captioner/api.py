"""The public API: `Captioner.from_pretrained(path).caption(images, ...)`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from captioner.checkpoint import Checkpoint, load_for_inference
from captioner.concepts import Concept, concept_logits_for
from captioner.config import DecodeConfig
from captioner.encoders.registry import Encoder
from captioner.features.encode import encode_images
from captioner.features.loader import jpeg_draft_size
from captioner.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from captioner.inference import Caption, decode_features
from captioner.rerank import ConsensusReranker, RerankConfig, reranker_for
from captioner.utils import resolve_device

ImageInput = str | Path | bytes | Image.Image


@dataclass
class CaptionResult:
    """Captions for one input (best first), or the reason it could not be captioned. Each caption carries
    the photo's concepts (`Caption.concepts`)."""

    source: str
    captions: list[Caption] = field(default_factory=list)
    error: str | None = None

    @property
    def caption(self) -> str | None:
        return self.captions[0].text if self.captions else None

    @property
    def concepts(self) -> list[Concept]:
        """The concepts recognised in the photo that its captions were made to mention (empty: none, or off)."""
        return self.captions[0].concepts if self.captions else []


class Captioner:
    """A trained decoder with the CNN it was trained on. Load once, caption many images."""

    def __init__(self, checkpoint: Checkpoint, encoder: Encoder, device: torch.device,
                 reranker: ConsensusReranker | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.checkpoint = checkpoint
        self.encoder = encoder
        self.device = device
        self.reranker = reranker
        self.max_pixels = max_pixels  # the most pixels decoded per image (see captioner.images.load_image)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "auto",
                        encoder_weights: str | Path | None = None, memory: str | Path | None = None,
                        rerank: RerankConfig | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Captioner:
        """Load a checkpoint (default: `default_checkpoint_path()`, $CAPTIONER_CHECKPOINT or the shipped Flickr8k
        model) and the CNN its encoder entry names.

        memory: a caption memory (`captioner memory`) built with this checkpoint's CNN; beam search then
        re-ranks its candidates by consensus with the nearest memory images' captions (`rerank` settings).
        max_pixels: the most pixels decoded per image; larger JPEGs are decoded at reduced scale, other
        formats refused (see `captioner.images.load_image`)."""
        device_ = resolve_device(device)
        checkpoint, encoder = load_for_inference(path, device_, encoder_weights)
        reranker = None if memory is None else reranker_for(memory, checkpoint.encoder, str(checkpoint.path), rerank)
        return cls(checkpoint, encoder, device_, reranker, max_pixels=max_pixels)

    @property
    def vocab(self):
        return self.checkpoint.vocab

    @property
    def draft_size(self) -> int:
        """JPEGs are decoded at reduced scale down to this side, no further (twice the CNN's input)."""
        return jpeg_draft_size(self.encoder.preprocessor)

    def load_image(self, image: ImageInput) -> Image.Image:
        """An image as `caption` loads it: reduced-scale JPEG decoding, this captioner's pixel limit."""
        return load_image(image, max_pixels=self.max_pixels, draft_size=self.draft_size)

    def decode_config(self, config: DecodeConfig | None = None, **overrides: Any) -> DecodeConfig:
        return replace(config or DecodeConfig(), **overrides)

    def concept_logits(self, features: torch.Tensor) -> torch.Tensor | None:
        """ImageNet logits of this captioner's CNN features, from the CNN's own classifier (None: it has none)."""
        return concept_logits_for(self.encoder, features.to(self.device))

    def caption_features(self, features: torch.Tensor, config: DecodeConfig) -> list[list[Caption]]:
        """Captions for features of this captioner's CNN; with a caption memory, beam search is re-ranked
        (other strategies not). Unless `config.concept_threshold` is None, the CNN's classifier names the
        photos' concepts, which every caption carries and beam search is made to mention."""
        reranker = self.reranker if config.strategy == "beam" else None
        features = features.to(self.device)
        logits = None if config.concept_threshold is None else self.concept_logits(features)
        return decode_features(self.checkpoint.model, self.vocab, features, config, reranker=reranker,
                               concept_logits=logits)

    def caption(self, images: ImageInput | list[ImageInput], config: DecodeConfig | None = None,
                batch_size: int = 32, **overrides: Any) -> list[CaptionResult]:
        """Caption PIL images, paths or encoded bytes. Options are DecodeConfig fields, e.g.
        `strategy="beam", beam_size=3, n_best=1`, or `concept_threshold=None` for captions without concepts.
        An unreadable image gets a result with `.error`."""
        if not isinstance(images, list):
            images = [images]
        config = self.decode_config(config, **overrides)
        results: list[CaptionResult] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            loaded, loaded_results, chunk_results = [], [], []
            for image in chunk:
                source = str(image) if isinstance(image, (str, Path)) else type(image).__name__
                result = CaptionResult(source)
                try:
                    loaded.append(self.load_image(image))
                    loaded_results.append(result)
                except ImageLoadError as error:
                    result.error = str(error)
                chunk_results.append(result)
            if loaded:
                encoded = encode_images(loaded, self.encoder, max_pixels=self.max_pixels)
                for position, reason in encoded.failures:
                    loaded_results[position].error = f"{loaded_results[position].source}: {reason}"
                captions = self.caption_features(encoded.features, config)
                for position, image_captions in zip(encoded.indices, captions, strict=True):
                    loaded_results[position].captions = image_captions
            results.extend(chunk_results)
        return results
