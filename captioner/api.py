"""The public API: `Captioner.from_pretrained(path).caption(images, ...)`.

A `Captioner` is a checkpoint's decoder with the CNN it was trained on (and, optionally, a caption memory
for re-ranking). Its `stream` is the one image -> caption pipeline (`captioner.pipeline`) that the batch
command and the demo run too; `caption` collects it into one result per input."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from captioner.checkpoint import Checkpoint, load_for_inference
from captioner.concepts import Concept, concept_logits_for
from captioner.config import DecodeConfig, RerankConfig
from captioner.decoding.captions import Caption, decode_features
from captioner.decoding.rerank import ConsensusReranker, reranker_for
from captioner.encoders.registry import Encoder
from captioner.features.loader import jpeg_draft_size
from captioner.images import DEFAULT_MAX_PIXELS, ImageSource, load_image, source_name
from captioner.pipeline import ImageCaptions, caption_images
from captioner.utils import resolve_device


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

    def load_image(self, image: ImageSource) -> Image.Image:
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

    def stream(self, images: Sequence[ImageSource], config: DecodeConfig | Sequence[DecodeConfig], *,
               batch_size: int = 32, decode_batch_size: int | None = None,
               num_workers: int | None = None) -> Iterator[list[ImageCaptions]]:
        """The pipeline (`captioner.pipeline.caption_images`) with this captioner's CNN, decoder and pixel
        limit: groups of results in input order, `batch_size` images per CNN batch, decoded
        `decode_batch_size` (default: `batch_size`) at a time; one config for all, or one per image."""
        return caption_images(images, self.encoder, self.caption_features, config, batch_size=batch_size,
                              decode_batch_size=decode_batch_size or batch_size, num_workers=num_workers,
                              max_pixels=self.max_pixels)

    def caption(self, images: ImageSource | list[ImageSource], config: DecodeConfig | None = None,
                batch_size: int = 32, **overrides: Any) -> list[CaptionResult]:
        """Caption PIL images, paths or encoded bytes. Options are DecodeConfig fields, e.g.
        `strategy="beam", beam_size=3, n_best=1`, or `concept_threshold=None` for captions without concepts.
        An unreadable image gets a result with `.error`. (`stream` gives the results group by group.)"""
        if not isinstance(images, list):
            images = [images]
        config = self.decode_config(config, **overrides)
        results: list[CaptionResult] = []
        for group in self.stream(images, config, batch_size=batch_size):
            for item in group:
                image = images[item.index]
                source = str(image) if isinstance(image, (str, Path)) else type(image).__name__
                error = None if item.error is None else f"{source_name(image)}: {item.error}"
                results.append(CaptionResult(source, item.captions or [], error))
        return results
