"""Batches of loaded, preprocessed, normalised images from a list of files (or in-memory images), in order;
a file that does not load becomes a failure (position, reason) and the rest continue."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from captioner.encoders.preprocessing import Preprocessor
from captioner.encoders.registry import Encoder
from captioner.images import DEFAULT_MAX_PIXELS, ImageLoadError, ImageSource, load_image


def jpeg_draft_size(preprocessor: Preprocessor) -> int:
    """The side JPEGs are decoded to at least (reduced-scale decoding, `load_image(draft_size=...)`): twice
    the size the preprocessing resizes to, so the antialiased resize that follows still averages at least
    2×2 decoded pixels into each CNN pixel. Photos with a shorter side under twice this are decoded in full."""
    return 2 * max(preprocessor.input_size, preprocessor.resize_size)


class ImageFiles(Dataset):
    """Position -> (position, uint8 pixels (3, H, W) or None, reason or None) for a list of image files.

    `__getitems__` (which DataLoader prefers for whole batches) loads a batch with `load_threads` threads:
    PIL releases the GIL while decoding and resizing, so one process can use every core for loading and
    then every core for the CNN, in turns, without the oversubscription that worker processes competing
    with the CNN's threads cause on a small CPU.
    """

    def __init__(self, paths: Sequence[ImageSource], preprocessor: Preprocessor, max_pixels: int,
                 draft: bool, load_threads: int) -> None:
        self.paths = list(paths)
        self.preprocessor = preprocessor
        self.max_pixels = max_pixels
        self.draft_size = jpeg_draft_size(preprocessor) if draft else None
        self.load_threads = load_threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_image(self.paths[position], max_pixels=self.max_pixels, draft_size=self.draft_size)
        except ImageLoadError as error:
            return position, None, error.reason
        return position, self.preprocessor.to_pixels(image), None

    def __getitems__(self, positions: list[int]) -> list[tuple[int, torch.Tensor | None, str | None]]:
        if self.load_threads <= 1 or len(positions) <= 1:
            return [self[position] for position in positions]
        if self._pool is None or self._pool_pid != os.getpid():  # one pool per (worker) process
            self._pool = ThreadPoolExecutor(self.load_threads, thread_name_prefix="load_image")
            self._pool_pid = os.getpid()
        return list(self._pool.map(self.__getitem__, positions))

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True)
        self._pool = None


def collate_images(samples: list[tuple[int, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    loaded = [(position, pixels) for position, pixels, _ in samples if pixels is not None]
    return {
        "indices": [position for position, _ in loaded],
        "pixels": Preprocessor.stack([pixels for _, pixels in loaded]) if loaded else None,  # (B, 3, H, W) uint8
        "failures": [(position, reason) for position, pixels, reason in samples if pixels is None],
    }


@dataclass
class ImageBatch:
    """One batch from `image_loader`."""

    indices: list[int]  # positions, in the input list, of the images that loaded
    images: torch.Tensor | None  # (len(indices), 3, H, W) normalised float32, None if none loaded
    failures: list[tuple[int, str]]  # (position, reason) of the images that did not load

    def __len__(self) -> int:
        return len(self.indices) + len(self.failures)


class ImageLoader:
    """Batches of loaded, preprocessed, normalised images; see `image_loader`. Has `len()` (batches)."""

    def __init__(self, dataset: ImageFiles, loader: DataLoader, preprocessor: Preprocessor,
                 device: torch.device, channels_last: bool) -> None:
        self.dataset = dataset
        self.loader = loader
        self.preprocessor = preprocessor
        self.device = device
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[ImageBatch]:
        try:
            for batch in self.loader:
                images = None
                if batch["pixels"] is not None:
                    pixels = batch["pixels"].to(self.device, non_blocking=True)
                    images = self.preprocessor.normalize(pixels, channels_last=self.channels_last)
                yield ImageBatch(batch["indices"], images, batch["failures"])
        finally:
            self.dataset.close()


def image_loader(
    paths: Sequence[ImageSource],
    encoder: Encoder,
    batch_size: int = 64,
    num_workers: int | None = None,
    load_threads: int | None = None,
    device: str | torch.device | None = None,
    channels_last: bool | None = None,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageLoader:
    """Load and preprocess image files in batches, in order, for `encoder`; bad files become failures.

    num_workers, load_threads: DataLoader worker processes, and threads that load one batch together.
        None chooses by device: on CPU, 0 workers and one load thread per core (max 8), so that loading
        and the CNN take turns on all cores (worker processes compete with the CNN's threads and measured
        slower: `scripts/bench/features.py --num-workers 2`); on GPU, min(8, cores) workers with one
        thread each.
    device: where the normalised batches go (default: the encoder's device).
    channels_last: give the CNN channels-last batches; None chooses it on CPU, where it is faster for
        EfficientNet-Lite0 (`scripts/bench/features.py --no-channels-last` measures the difference).
    draft: let the JPEG decoder downscale large photos while decoding, to no less than
        `jpeg_draft_size(encoder.preprocessor)`; False decodes every photo in full (slower, same pixels for
        photos under twice that size).
    max_pixels: the most pixels decoded per image (see `load_image`).
    """
    device = torch.device(device) if device is not None else encoder.device
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_workers is None:
        num_workers = 0 if device.type == "cpu" else min(8, cores)
    if load_threads is None:
        load_threads = min(8, cores) if num_workers == 0 else 1
    if channels_last is None:
        channels_last = device.type == "cpu"
    dataset = ImageFiles(paths, encoder.preprocessor, max_pixels, draft, load_threads)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_images,
        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
    return ImageLoader(dataset, loader, encoder.preprocessor, device, channels_last)
