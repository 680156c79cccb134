"""Safe image loading: the one place every door (training, captioning, the demo) opens an image.

`load_image` returns an upright 8-bit RGB `PIL.Image.Image` or raises `ImageLoadError`, whose message
names the file and the reason. For a path it first checks what the path is (only regular files are
opened: a named pipe, socket or device would block or never end) and reads the file in a worker
thread that gives up when no byte arrives for `read_timeout` seconds (a stalled network mount); that
reading lives in `captioner.images.files`.
JPEGs are decoded at reduced scale when the caller needs fewer pixels (`draft_size`) or when the full
size would exceed `max_pixels`; every other format must be decoded in full, so its header size is
checked against `max_pixels` before any pixel is decoded. HEIC/HEIF photos are read through
pillow-heif, registered the first time such a file is met. Decoding is forced, so truncated files fail
here rather than later; the EXIF orientation is applied, the first frame of an animation kept, and
every PIL mode becomes a sensible RGB image: alpha is composited on white and 16-bit / integer / float
data are scaled down, not clipped.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.images.files import DEFAULT_READ_TIMEOUT, ImageLoadError, file_size_limit, read_image_file

ImageSource = str | os.PathLike | bytes | Image.Image  # what `load_image` opens: a path, encoded bytes, a PIL image

DEFAULT_MAX_PIXELS = 40_000_000
# A sequential JPEG decoded at 1/8 scale has 1/64 of its header's pixels and needs only a few rows of
# working memory, so 64 × max_pixels is the largest header that reduced decoding can bring under the
# limit; beyond it the file is refused unread. A progressive JPEG's decoder keeps every DCT coefficient
# of the full image whatever the scale (2 bytes each: 3 bytes a header pixel at 4:2:0, 6 at 4:4:4), so
# its header may be at most 4 × max_pixels: about the memory a full decode at the limit costs.
JPEG_HEADER_FACTOR = 64
PROGRESSIVE_JPEG_HEADER_FACTOR = 4
_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a phone's JPEG with a depth map or preview as a second frame
_EXIF_ORIENTATION = 0x0112
_WHITE = (255, 255, 255)
_OPEN_LOCK = threading.Lock()
_HEIF_LOCK = threading.Lock()
_heif_registered = False
# ISO base media `ftyp` brands: HEIF stills (HEVC-coded, or the generic image brands), AVIF, video.
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
_GENERIC_IMAGE_BRANDS = {b"mif1", b"msf1", b"mif2", b"heif"}
_AVIF_BRANDS = {b"avif", b"avis"}
_VIDEO_BRANDS = {b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"qt  ", b"M4V ", b"M4A ",
                 b"3gp4", b"3gp5", b"3gp6", b"3g2a", b"avc1", b"dash", b"MSNV", b"f4v "}


def source_name(source: ImageSource) -> str:
    """How errors name `source`: its path, `<N bytes>` or `<PIL image>` (as `ImageLoadError.path`)."""
    if isinstance(source, Image.Image):
        return "<PIL image>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(Path(source))


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> Image.Image:
    """Open `source` (a path, encoded bytes or a PIL image) as an upright RGB image.

    max_pixels: the most pixels decoded. A JPEG larger than that is decoded at 1/2, 1/4 or 1/8 scale to
        fit (its header may declare up to 64× the limit, 4× for a progressive JPEG); any other format
        larger than that is refused from its header, before decoding (a possible decompression bomb).
    draft_size: for JPEGs, let the decoder downscale by a power of two while keeping both sides at least
        this many pixels (`Image.draft`); much cheaper decoding for large photos, slightly different
        pixels. None (the default) decodes at full size when the limit allows.
    read_timeout: seconds without a byte after which reading a file is given up (a stalled mount).
    """
    if not isinstance(source, (Image.Image, bytes, bytearray, memoryview, str, os.PathLike)):
        raise TypeError(f"load_image expects a path, bytes or a PIL image, not {type(source).__name__}")
    name = source_name(source)
    if isinstance(source, Image.Image):
        return _to_upright_rgb(_loaded(source, name, max_pixels), name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageLoadError(name, "empty (0 bytes)")
        return _decode(io.BytesIO(data), name, max_pixels, draft_size, head=data[:512])
    data = read_image_file(source, timeout=read_timeout, max_bytes=file_size_limit(max_pixels))
    return _decode(io.BytesIO(data), name, max_pixels, draft_size, head=data[:512])


def _ftyp_brands(head: bytes) -> set[bytes]:
    """The major and compatible brands of an ISO base media file's leading `ftyp` box (empty if none)."""
    if len(head) < 16 or head[4:8] != b"ftyp":
        return set()
    end = min(len(head), int.from_bytes(head[:4], "big"))
    return {head[8:12]} | {head[i:i + 4] for i in range(16, end - 3, 4)}


def _is_heif(head: bytes) -> bool:
    brands = _ftyp_brands(head)
    return bool(brands & _HEIF_BRANDS) or bool(brands & _GENERIC_IMAGE_BRANDS and not brands & _AVIF_BRANDS)


def _register_heif() -> bool:
    """Register pillow-heif's opener with PIL, once per process; False when pillow-heif is not installed.
    Imported only here, when a HEIF file is met, so `import captioner` stays cheap."""
    global _heif_registered
    with _HEIF_LOCK:
        if not _heif_registered:
            try:
                import pillow_heif
            except ImportError:
                return False
            pillow_heif.register_heif_opener()
            _heif_registered = True
    return True


def _open(file: BinaryIO, name: str, head: bytes) -> Image.Image:
    """Image.open with our own size checks deciding (see `_decode`), errors turned into ImageLoadError."""
    if _is_heif(head):
        _register_heif()
    # PIL refuses (above 2 × MAX_IMAGE_PIXELS) or warns about large headers while opening; our checks,
    # just after, decide instead (a 200-megapixel JPEG decoded at 1/8 scale is fine). The setting is
    # process-wide, so threads take turns here (header parsing only; decoding happens outside the lock).
    with _OPEN_LOCK:
        pil_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(file)
        except UnidentifiedImageError:
            raise ImageLoadError(name, _describe_unreadable(head)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageLoadError(name, f"corrupt image header ({error})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit


def _decode(file: BinaryIO, name: str, max_pixels: int, draft_size: int | None, head: bytes) -> Image.Image:
    image = _open(file, name, head)
    try:
        if image.format in _JPEG_FORMATS:
            _draft_jpeg(image, name, max_pixels, draft_size)
        _check_pixels(image, name, max_pixels)
        upright = _to_upright_rgb(_loaded(image, name, max_pixels), name, copy=False)
    except BaseException:
        image.close()
        raise
    if upright is not image:
        image.close()
    return upright  # an RGB JPEG comes back as decoded: no copy


def jpeg_scale(width: int, height: int, draft_size: int | None, max_pixels: int) -> int:
    """The JPEG decoding scale denominator (1, 2, 4 or 8): the largest that keeps both sides at least
    `draft_size` (1 when None), raised until the decoded pixels fit `max_pixels` when they would not.
    A photo whose shorter side is under 2 × draft_size is therefore always decoded at full size."""
    scale = 1
    if draft_size is not None:
        while scale < 8 and min(width, height) >= 2 * scale * draft_size:
            scale *= 2
    while scale < 8 and -(-width // scale) * -(-height // scale) > max_pixels:
        scale *= 2
    return scale


def _draft_jpeg(image: Image.Image, name: str, max_pixels: int, draft_size: int | None) -> None:
    """Set up reduced-scale decoding for a JPEG (`Image.draft`), after the header sanity cap."""
    width, height = image.size
    progressive = bool(image.info.get("progressive") or image.info.get("progression"))
    factor = PROGRESSIVE_JPEG_HEADER_FACTOR if progressive else JPEG_HEADER_FACTOR
    if width * height > factor * max_pixels:
        kind = "progressive JPEG" if progressive else "JPEG"
        raise ImageLoadError(
            name,
            f"too many pixels ({width}×{height} = {width * height:,} > {factor} × max_pixels={max_pixels:,} "
            f"for a {kind}, even decoded at reduced scale); refusing a possible decompression bomb",
        )
    scale = jpeg_scale(width, height, draft_size, max_pixels)
    if scale > 1:
        # Asking for (width // scale, height // scale) makes PIL pick exactly `scale` (see jpeg_scale).
        image.draft(image.mode, (max(1, width // scale), max(1, height // scale)))


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


def _describe_unreadable(head: bytes) -> str:
    """What a file that PIL cannot open looks like, for the error message: an image in a format we
    cannot read, a known kind of non-image, or, when nothing fits, unrecognised data."""
    brands = _ftyp_brands(head)
    if brands & _HEIF_BRANDS or (brands & _GENERIC_IMAGE_BRANDS and not brands & _AVIF_BRANDS):
        missing = "" if _register_heif() else "; install pillow-heif to read it"
        return f"an image in a format we cannot read (HEIC/HEIF{missing})"
    if brands & _AVIF_BRANDS:
        return "an image in a format we cannot read (AVIF: this Pillow was built without AVIF support)"
    if b"crx " in brands:
        return "an image in a format we cannot read (Canon CR3 raw photo; export it as JPEG)"
    if brands & _VIDEO_BRANDS:
        return "not an image: looks like a video (MP4/QuickTime)"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "an image in a format we cannot read (JPEG XL)"
    if head.startswith(b"FUJIFILMCCD-RAW"):
        return "an image in a format we cannot read (Fujifilm RAF raw photo; export it as JPEG)"
    if head.startswith((b"IIRO", b"IIRS", b"IIU\x00")):
        return "an image in a format we cannot read (Olympus/Panasonic raw photo; export it as JPEG)"
    if head.startswith(b"%PDF"):
        return "not an image: looks like a PDF document"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "not an image: looks like an HTML page (a failed download?)"
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in stripped):
        return "an image in a format we cannot read (SVG vector drawing)"
    if stripped.startswith(b"<?xml"):
        return "not an image: looks like XML"
    if stripped.startswith((b"{", b"[")):
        return "not an image: looks like JSON text"
    if head.startswith(b"PK\x03\x04"):
        return "not an image: looks like a ZIP archive (or an Office/OpenDocument file)"
    if head.startswith((b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!\x1a\x07", b"BZh")):
        return "not an image: looks like a compressed archive"
    if head.startswith(b"\x7fELF") or head.startswith(b"MZ"):
        return "not an image: looks like a program"
    if head.startswith((b"ID3", b"OggS", b"fLaC")) or (head.startswith(b"RIFF") and head[8:12] == b"WAVE"):
        return "not an image: looks like audio"
    if head.startswith(b"\x1a\x45\xdf\xa3") or (head.startswith(b"RIFF") and head[8:12] == b"AVI "):
        return "not an image: looks like a video (WebM/Matroska/AVI)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "not an image: unrecognised binary data"
    if all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return "not an image: looks like a text file"
    return "not an image: unrecognised data"
