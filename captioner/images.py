"""Safe image loading: the one place every door (training, captioning, the demo) opens an image.

`load_image` returns an upright 8-bit RGB `PIL.Image.Image` or raises `ImageLoadError`, whose message
names the file and the reason. It refuses oversized images from the header alone (before any pixel is
decoded), forces a full decode so that truncated files fail here rather than later, applies the EXIF
orientation, keeps the first frame of animations and turns every PIL mode into a sensible RGB image:
alpha is composited on white and 16-bit / integer / float data are scaled down, not clipped.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
_EXIF_ORIENTATION = 0x0112
_WHITE = (255, 255, 255)
_OPEN_LOCK = threading.Lock()


class ImageLoadError(ValueError):
    """An image could not be loaded. `.path` names the source, `.reason` says why in a few words."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def load_image(
    source: str | Path | bytes | Image.Image,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Open `source` (a path, encoded bytes or a PIL image) as an upright RGB image.

    max_pixels: width × height above which the image is refused, checked from the header before decoding.
        PIL's own hard limit (2 × `PIL.Image.MAX_IMAGE_PIXELS`) still applies on top of it.
    draft_size: for JPEGs, let the decoder downscale by a power of two while keeping both sides at least
        this many pixels (`Image.draft`); cheaper decoding for large photos, slightly different pixels.
        None (the default) decodes at full size.
    """
    if isinstance(source, Image.Image):
        return _to_upright_rgb(_loaded(source, "<PIL image>", max_pixels), "<PIL image>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = f"<{len(source)} bytes>"
        data = bytes(source)
        if not data:
            raise ImageLoadError(name, "empty (0 bytes)")
        return _decode(io.BytesIO(data), name, max_pixels, draft_size, head=data[:512])
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_image expects a path, bytes or a PIL image, not {type(source).__name__}")

    path = Path(source)
    name = str(path)
    try:
        file = open(path, "rb")  # closed by the `with` below
    except FileNotFoundError:
        raise ImageLoadError(name, "file not found") from None
    except PermissionError:
        raise ImageLoadError(name, "permission denied") from None
    except IsADirectoryError:
        raise ImageLoadError(name, "is a directory, not an image file") from None
    except OSError as error:
        raise ImageLoadError(name, f"cannot open file ({error.strerror or error})") from None
    with file:
        try:
            size = os.fstat(file.fileno()).st_size
            head = file.read(512)
            file.seek(0)
        except OSError as error:
            raise ImageLoadError(name, f"cannot read file ({error.strerror or error})") from None
        if size == 0:
            raise ImageLoadError(name, "empty file (0 bytes)")
        return _decode(file, name, max_pixels, draft_size, head=head)


def _decode(file: BinaryIO, name: str, max_pixels: int, draft_size: int | None, head: bytes) -> Image.Image:
    # PIL warns above MAX_IMAGE_PIXELS while reading the header; our own limit (checked just after)
    # decides instead. catch_warnings swaps a process-wide filter list, so threads take turns here
    # (header parsing only; decoding happens outside the lock).
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(file)
        except Image.DecompressionBombError as error:
            raise ImageLoadError(name, f"too many pixels ({error}); refusing a possible decompression bomb") from None
        except UnidentifiedImageError:
            raise ImageLoadError(name, f"not an image: {_describe_non_image(head)}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageLoadError(name, f"corrupt image header ({error})") from None
    try:
        _check_pixels(image, name, max_pixels)
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        upright = _to_upright_rgb(_loaded(image, name, max_pixels), name, copy=False)
    except BaseException:
        image.close()
        raise
    if upright is not image:
        image.close()
    return upright  # an RGB JPEG comes back as decoded: no copy (the caller's file is closed by the caller)


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(
            name,
            f"too many pixels ({width}×{height} = {width * height:,} > max_pixels={max_pixels:,}); "
            "refusing a possible decompression bomb",
        )
    if width == 0 or height == 0:
        raise ImageLoadError(name, f"image has no pixels ({width}×{height})")


def _loaded(image: Image.Image, name: str, max_pixels: int) -> Image.Image:
    """Force a full decode so that truncated or corrupt data fails here, with the file named."""
    _check_pixels(image, name, max_pixels)
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageLoadError(name, f"too many pixels ({error}); refusing a possible decompression bomb") from None
    except MemoryError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ... for bad data
        message = str(error) or type(error).__name__
        raise ImageLoadError(name, f"truncated or corrupt image data ({message})") from None
    return image


def _to_upright_rgb(image: Image.Image, name: str, copy: bool = True) -> Image.Image:
    """`image` upright and in RGB; copy=False allows returning `image` itself when nothing changes."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # unreadable EXIF: keep the pixels as stored
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        image = ImageOps.exif_transpose(image)
    try:
        return _to_rgb(image, copy=copy)
    except (ValueError, OSError) as error:
        raise ImageLoadError(name, f"cannot convert mode {image.mode!r} to RGB ({error})") from None


def _to_rgb(image: Image.Image, copy: bool = True) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(image)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        if mode == "RGB" and not copy:
            return image
        return image.convert("RGB")  # also a copy when already RGB: callers never share our image
    rgba = image.convert("RGBA")  # applies a palette or tRNS transparency entry as alpha
    if rgba.getextrema()[3][0] == 255:  # fully opaque: nothing to composite
        return rgba.convert("RGB")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale to 8-bit RGB by scaling the value range, not clipping.

    I;16*: 0..65535 -> 0..255. I: 16-bit range if the values fit (PNG 16-bit greyscale opens as I in
    some Pillow versions), otherwise stretched from min..max. F: 0..1 taken as unit range, 0..255 as
    8-bit range, anything else stretched from min..max.
    """
    values = np.asarray(image).astype(np.float64)
    if values.size == 0:
        return Image.new("RGB", image.size)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    mode = image.mode
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535 and high > 255):
        scaled = values / 257.0
    elif mode == "I" and low >= 0 and high <= 255:
        scaled = values
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif mode == "F" and low >= 0 and high <= 255:
        scaled = values
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    grey = np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _describe_non_image(head: bytes) -> str:
    """A few words about what a file that PIL cannot read looks like, for the error message."""
    stripped = head.lstrip().lower()
    if head.startswith(b"%PDF"):
        return "looks like a PDF document"
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "looks like an HTML page (a failed download?)"
    if stripped.startswith((b"<?xml", b"<svg")):
        return "looks like XML/SVG, which is not supported"
    if stripped.startswith((b"{", b"[")):
        return "looks like JSON text"
    if head.startswith((b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf")):
        return "looks like an archive"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary data"
    if text.isprintable() or all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return "looks like a text file"
    return "unrecognised data"
