"""The one pipeline from images to captions: image files, encoded bytes or PIL images -> results, in input order.

Every door that captions photos runs it: `captioner caption` (apps/batch.py), `Captioner.caption` (api.py)
and the demo (apps/demo.py). Its stages are iterators, each pulling from the one before:

  1. load, preprocess, CNN   `features.encode.encoded_batches`: `batch_size` images at a time; every image is
                             read and decoded once (`captioner.images.load_image`), and one that does not load
                             becomes a failure with its reason while the rest go on
  2. gather                  loader batches until `decode_batch_size` features wait: batched beam search gains
                             more from large batches than the CNN does
  3. decode                  the gathered features through `decode(features, config)`, one call per setting
  4. order                   the group's results (captions or errors) in input order

Memory stays bounded: one gathered group of features and its results at a time, whatever the number of
inputs. The stages run one after the other in this thread; since each only pulls from the one before, a
change that runs them concurrently (loading the next batch while the CNN and the search work) replaces
how they are chained, not what they do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from captioner.config import DecodeConfig
from captioner.decoding.captions import Caption
from captioner.encoders.registry import Encoder
from captioner.features.encode import EncodedBatch, encoded_batches
from captioner.images import DEFAULT_MAX_PIXELS, ImageSource

# features (N, D) and their settings -> n-best Captions per row (None: that row could not be captioned)
Decode = Callable[[torch.Tensor, DecodeConfig], Sequence[list[Caption] | None]]


@dataclass
class ImageCaptions:
    """What the pipeline gives for one input: its captions, best first, or why it has none."""

    index: int  # position in the inputs
    captions: list[Caption] | None = None
    error: str | None = None  # the reason the image did not load (`ImageLoadError.reason`)


def caption_images(inputs: Sequence[ImageSource], encoder: Encoder, decode: Decode,
                   config: DecodeConfig | Sequence[DecodeConfig], *, batch_size: int = 32,
                   decode_batch_size: int = 128, num_workers: int | None = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[list[ImageCaptions]]:
    """Caption `inputs` through the stages above; yields each decoded group's results in input order, so
    the groups together hold every input once, in order.

    config: one DecodeConfig for every input, decoded in one call per group; or one per input, in which
    case inputs with equal settings are decoded together, and sampled ones each alone (so that a seeded
    draw depends only on its own image, not on who else is in the group).
    num_workers, max_pixels: see `features.loader.image_loader`."""
    if not isinstance(config, DecodeConfig) and len(config) != len(inputs):
        raise ValueError(f"caption_images: {len(config)} decoding settings for {len(inputs)} inputs")
    batches = encoded_batches(inputs, encoder, batch_size=batch_size, num_workers=num_workers,
                              max_pixels=max_pixels)
    for group in gathered(batches, decode_batch_size):
        yield decode_group(group, decode, config)


def gathered(batches: Iterable[EncodedBatch], decode_batch_size: int) -> Iterator[list[EncodedBatch]]:
    """Loader batches grouped until at least `decode_batch_size` of their images loaded (the last group may
    hold fewer); a batch whose images all failed joins the next group."""
    waiting: list[EncodedBatch] = []
    loaded = 0
    for batch in batches:
        waiting.append(batch)
        loaded += len(batch.indices)
        if loaded >= decode_batch_size:
            yield waiting
            waiting, loaded = [], 0
    if waiting:
        yield waiting


def decode_group(group: list[EncodedBatch], decode: Decode,
                 config: DecodeConfig | Sequence[DecodeConfig]) -> list[ImageCaptions]:
    """One gathered group decoded (see `caption_images` for `config`): every image of its batches, in order."""
    results = {position: ImageCaptions(position, error=reason) for batch in group for position, reason in batch.failures}
    loaded = [batch for batch in group if batch.indices]
    indices = [index for batch in loaded for index in batch.indices]
    if indices:
        features = torch.cat([batch.features for batch in loaded])  # (len(indices), D)
        for rows, row_config in setting_groups(indices, config):
            chosen = features if len(rows) == len(indices) else features[rows]
            for row, captions in zip(rows, decode(chosen, row_config), strict=True):
                results[indices[row]] = ImageCaptions(indices[row], captions)
    return [results[position] for position in sorted(results)]


def setting_groups(indices: list[int], config: DecodeConfig | Sequence[DecodeConfig]
                   ) -> list[tuple[list[int], DecodeConfig]]:
    """(rows of `indices`, their settings) per decoder call: all rows with one config; else rows with equal
    settings together, each sampled row alone."""
    if isinstance(config, DecodeConfig):
        return [(list(range(len(indices))), config)]
    groups: dict[Any, list[int]] = {}
    for row, index in enumerate(indices):
        setting = config[index]
        groups.setdefault(("sample", row) if setting.strategy == "sample" else repr(setting), []).append(row)
    return [(rows, config[indices[rows[0]]]) for rows in groups.values()]
