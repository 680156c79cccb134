"""An encoder's input preparation: PIL image -> uint8 pixels (in loader workers) -> normalised float32 (per batch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image

ResizeMode = Literal["squash", "shorter_side_crop"]


class PreprocessingSpec(Protocol):
    """What preprocessing needs of an encoder's spec (`captioner.encoders.registry.EncoderSpec` has it)."""

    resize: ResizeMode
    input_size: int
    resize_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Preprocessor:
    """An encoder's input preparation, split in two so that data-loader workers can do the PIL part and
    ship compact uint8 tensors, while the normalisation runs once per batch.

    `to_pixels(image)` -> uint8 (3, input_size, input_size); `normalize(pixels)` -> float32, any leading
    batch shape. Holds no model, so it pickles cheaply into worker processes.
    """

    def __init__(self, spec: PreprocessingSpec) -> None:
        self.resize: ResizeMode = spec.resize
        self.input_size = spec.input_size
        self.resize_size = spec.resize_size or spec.input_size
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)

    def to_pixels(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = self.input_size
        if self.resize == "squash":
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
        else:
            image = centre_crop(resize_shorter_side(image, self.resize_size), size)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W), HWC strides

    @staticmethod
    def stack(pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack `to_pixels` outputs into a uint8 batch (B, 3, H, W) laid out channels-last, as they come,
        so that a channels-last `normalize` needs no layout change."""
        return torch.stack([p.permute(1, 2, 0) for p in pixels]).permute(0, 3, 1, 2)

    def normalize(self, pixels: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        batched = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        images = batched.to(torch.float32, memory_format=memory_format)
        images.sub_(self.mean).mul_(self.inv_std)
        return images if pixels.dim() == 4 else images[0]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_pixels(image))



def resize_shorter_side(image: Image.Image, shorter: int) -> Image.Image:
    """Shorter side -> `shorter`, longer side scaled and truncated (as torchvision's Resize(int) does)."""
    width, height = image.size
    if width <= height:
        new_size = (shorter, int(shorter * height / width))
    else:
        new_size = (int(shorter * width / height), shorter)
    return image if new_size == image.size else image.resize(new_size, Image.BILINEAR)


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))
