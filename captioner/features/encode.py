"""The one route from images to features: files, encoded bytes or PIL images -> pooled CNN features.

Every door goes through here: the feature cache writer (`captioner.features.extract`), `captioner caption`,
the Python API, evaluation, the caption memory and training's validation. Features are float32 rounded
through float16, exactly as a cache stores them, so a caption computed from a photo matches the one
computed from its cached row.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captioner.checkpoint import load_checkpoint
from captioner.encoders.registry import DEFAULT_ENCODER, Encoder, checkpoint_encoder, get_encoder
from captioner.features.loader import image_loader
from captioner.images import DEFAULT_MAX_PIXELS, ImageSource
from captioner.utils import progress_bar


def encode_batch(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, H, W) -> float32 features (B, D) on the CPU, rounded through float16."""
    with torch.inference_mode():
        return encoder.model(images).float().cpu().to(torch.float16).to(torch.float32)


@dataclass
class EncodedBatch:
    """One loader batch through the CNN."""

    indices: list[int]  # positions, in the input list, of the images that loaded
    features: torch.Tensor  # (len(indices), feature_dim) float32
    failures: list[tuple[int, str]]  # (position, reason) of the images that did not load

    def __len__(self) -> int:
        return len(self.indices) + len(self.failures)


@dataclass
class EncodedImages:
    """What `encode_images` returns: the features of the inputs that loaded, and why the others did not."""

    features: torch.Tensor  # (len(indices), feature_dim) float32, in input order
    indices: list[int] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)


def encoded_batches(inputs: Sequence[ImageSource], encoder: Encoder, batch_size: int = 64,
                    device: str | torch.device | None = None, num_workers: int | None = None,
                    load_threads: int | None = None, channels_last: bool | None = None, draft: bool = True,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[EncodedBatch]:
    """`inputs` through the CNN, one loader batch at a time, in order (see `image_loader` for the options:
    large JPEGs are decoded at reduced scale, images over `max_pixels` refused).
    Images already in memory are loaded in this process (they are not shipped to worker processes)."""
    if num_workers is None and not all(isinstance(item, (str, os.PathLike)) for item in inputs):
        num_workers = 0
    loader = image_loader(inputs, encoder, batch_size=batch_size, num_workers=num_workers,
                          load_threads=load_threads, device=device, channels_last=channels_last, draft=draft,
                          max_pixels=max_pixels)
    for batch in loader:
        if batch.images is None:
            features = torch.zeros((0, encoder.feature_dim), dtype=torch.float32)
        else:
            features = encode_batch(encoder, batch.images)
        yield EncodedBatch(batch.indices, features, batch.failures)


def encode_images(inputs: Sequence[ImageSource], encoder: Encoder, batch_size: int = 64,
                  device: str | torch.device | None = None, num_workers: int | None = None,
                  progress: bool = False, draft: bool = True,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> EncodedImages:
    """Features of image files, encoded bytes or PIL images: float32 (number loaded, feature_dim) in input
    order, with the positions that loaded and [(position, reason)] for those that did not.
    `device`: move the encoder there first (default: where it is)."""
    if device is not None:
        encoder.to(device)
    outputs: list[torch.Tensor] = []
    indices: list[int] = []
    failures: list[tuple[int, str]] = []
    bar = progress_bar(desc="features", enabled=progress, total=len(inputs), unit="img")
    with bar:
        for batch in encoded_batches(inputs, encoder, batch_size=batch_size, num_workers=num_workers,
                                     draft=draft, max_pixels=max_pixels):
            outputs.append(batch.features)
            indices.extend(batch.indices)
            failures.extend(batch.failures)
            bar.update(len(batch))
    features = torch.cat(outputs) if outputs else torch.zeros((0, encoder.feature_dim), dtype=torch.float32)
    return EncodedImages(features, indices, failures)


def feature_run_encoder(encoder: str | None = None, weights: str | Path | None = None, allow_random: bool = False,
                        checkpoint: str | Path | None = None) -> Encoder:
    """The CNN a feature run uses (`captioner features`): `encoder` with `weights` (default: the offline
    EfficientNet-Lite0), or the one `checkpoint` was trained with (its own fine-tuned weights when it
    carries them), checked against that checkpoint's weights hash. The two ways do not mix."""
    if not checkpoint:
        return get_encoder(encoder or DEFAULT_ENCODER, weights=weights, allow_random=allow_random)
    if encoder or weights or allow_random:
        raise ValueError("--checkpoint takes the CNN from the checkpoint; leave out --encoder, "
                         "--encoder-weights and --allow-random-weights")
    checkpoint = load_checkpoint(checkpoint)
    return checkpoint_encoder(checkpoint.encoder, str(checkpoint.path), checkpoint.encoder_state)
