"""A corpus of awkward and broken image files, built by code, and the checks of what the batch command
gives each one (tests/test_robustness.py sends the same files through every door).

The corpus: empty, truncated and corrupt files, text / HTML / PDF / random bytes named like images,
decompression bombs, 1×1 and 4000×3 images, CMYK, 16-bit, greyscale, RGBA, transparent palettes,
animations, WebP / TIFF / BMP, a JPEG named .png, an EXIF-rotated photo, odd file names, nested folders,
a dangling symlink and a symlink loop. `run_batch` sends the whole folder through one
`captioner caption --recursive` process; `judge` and `format_table` say what each input got and whether
that was the caption or the specific error it should get.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CAPTION = None  # a Case expecting a caption, not an error
SYMLINK_LOOP = "nested/loop"  # points back at the corpus folder: a recursive walk must not follow it


@dataclass(frozen=True)
class Case:
    """One corpus file: its path inside the corpus folder, what it is, and what the batch should give."""

    name: str
    what: str
    expect_error: str | None = CAPTION  # a fragment of the error reason, or None for a caption


def photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """A small photo-like RGB image (sky gradient, a dark block, noise) that looks different when rotated."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    sky = np.stack([60 + 120 * y / height, 120 + 80 * y / height, 230 - 100 * y / height], axis=-1)
    pixels = sky + rng.normal(0, 12, sky.shape)
    pixels[height // 2:, : width // 3] = (40, 90, 30)  # "grass" in the lower-left corner only
    pixels[height // 4: height // 2, width // 2: width // 2 + width // 6] = (200, 40, 40)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares width × height 8-bit RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _corrupt_png() -> bytes:
    """A complete PNG whose compressed pixel data has a flipped byte (its CRC no longer matches)."""
    data = bytearray(_encoded(photo(seed=5), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 40] ^= 0xFF
    return bytes(data)


def _palette_with_transparency() -> Image.Image:
    image = photo(seed=6).quantize(16)
    image.info["transparency"] = 0
    return image


def _animated_gif() -> bytes:
    frames = [photo(seed=seed).quantize(64) for seed in (7, 8, 9)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return buffer.getvalue()


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    """`image` stored sideways: a viewer (and the model) must turn it by the EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encoded(image, "JPEG", exif=exif, quality=95)


def build_corpus(folder: str | Path) -> list[Case]:
    """Write the bad-input corpus into `folder` (created) and return its cases, in no particular order."""
    folder = Path(folder)
    (folder / "nested" / "dossier été").mkdir(parents=True, exist_ok=True)
    base_jpeg = _encoded(photo(seed=1), "JPEG", quality=90)
    base_png = _encoded(photo(seed=2), "PNG")
    rng = np.random.default_rng(3)
    deep = (np.linspace(0, 65535, 96 * 64).reshape(64, 96)).astype(np.uint16)
    rgba = photo(seed=4).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    files: list[tuple[Case, bytes]] = [
        (Case("empty.jpg", "zero-byte file", "empty file"), b""),
        (Case("truncated.jpg", "JPEG cut in half", "truncated"), base_jpeg[: len(base_jpeg) // 2]),
        (Case("truncated.png", "PNG cut in half", "truncated"), base_png[: len(base_png) // 2]),
        (Case("corrupt-data.png", "PNG with a flipped byte in its pixel data", "corrupt"), _corrupt_png()),
        (Case("notes.jpg", "text file named .jpg", "looks like a text file"),
         b"shopping list: bread, milk, eggs\nremember the dog food\n"),
        (Case("download.jpg", "HTML error page named .jpg", "looks like an HTML page"),
         b"<!DOCTYPE html>\n<html><body><h1>404 Not Found</h1></body></html>\n"),
        (Case("scan.png", "PDF named .png", "looks like a PDF"), b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\n"),
        (Case("noise.webp", "random bytes named .webp", "not an image"),
         rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        (Case("bomb.png", "57-byte PNG declaring 50,000×50,000 pixels", "too many pixels"),
         png_header_only(50_000, 50_000)),
        (Case("over-limit.png", "PNG header declaring 8,000×6,000 pixels (48 Mpx)", "too many pixels"),
         png_header_only(8_000, 6_000)),
        (Case("one-pixel.png", "1×1 PNG"), _encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG")),
        (Case("one-pixel.jpg", "1×1 JPEG"), _encoded(Image.new("RGB", (1, 1), (30, 30, 200)), "JPEG")),
        (Case("panorama.png", "4000×3 pixels"), _encoded(photo(4000, 3, seed=10), "PNG")),
        (Case("tower.jpg", "3×4000 pixels"), _encoded(photo(3, 4000, seed=11), "JPEG")),
        (Case("cmyk.jpg", "CMYK JPEG"), _encoded(photo(seed=12).convert("CMYK"), "JPEG")),
        (Case("deep.png", "16-bit greyscale PNG"), _encoded(Image.fromarray(deep), "PNG")),
        (Case("grey.jpg", "greyscale JPEG"), _encoded(photo(seed=13).convert("L"), "JPEG")),
        (Case("rgba.png", "RGBA PNG with a transparency gradient"), _encoded(rgba, "PNG")),
        (Case("palette.png", "palette PNG with a transparent colour"),
         _encoded(_palette_with_transparency(), "PNG", transparency=0)),
        (Case("animated.gif", "animated GIF, 3 frames"), _animated_gif()),
        (Case("photo.webp", "WebP"), _encoded(photo(seed=14), "WEBP", quality=80)),
        (Case("photo.tiff", "TIFF"), _encoded(photo(seed=15), "TIFF")),
        (Case("photo.bmp", "BMP"), _encoded(photo(seed=16), "BMP")),
        (Case("really-a-jpeg.png", "JPEG data named .png"), base_jpeg),
        (Case("SHOUTING.JPG", "upper-case extension"), _encoded(photo(seed=17), "JPEG")),
        (Case("exif-rotated.jpg", "stored sideways, EXIF orientation 6"), exif_rotated_jpeg(photo(seed=18))),
        (Case("name with spaces.jpg", "spaces in the name"), _encoded(photo(seed=19), "JPEG")),
        (Case("ünïcødé 写真.jpg", "non-ASCII name"), _encoded(photo(seed=20), "JPEG")),
        (Case("line\u2028break.jpg", "U+2028 (a line separator) in the name"), _encoded(photo(seed=23), "JPEG")),
        (Case("nested/dossier été/deep photo.png", "two folders down"), _encoded(photo(seed=21), "PNG")),
    ]
    for case, data in files:
        (folder / case.name).write_bytes(data)
    cases = [case for case, _ in files]
    latin1 = Case(os.fsdecode(b"caf\xe9 latin-1.jpg"), "file name that is not UTF-8", CAPTION)
    try:  # some file systems (macOS) refuse such names
        (folder / latin1.name).write_bytes(_encoded(photo(seed=22), "JPEG"))
        cases.append(latin1)
    except OSError:
        pass
    dangling = Case("broken-link.jpg", "symlink to a file that does not exist", "file not found")
    _symlink(folder / dangling.name, folder / "deleted.jpg", directory=False)
    _symlink(folder / SYMLINK_LOOP, folder, directory=True)  # a loop: nested/loop/nested/loop/...
    return [*cases, dangling]


def shown(name: str) -> str:
    """A file name printable on one line of any terminal: bytes that are not UTF-8 appear as \\xNN,
    line breaks and other unprintable characters as \\uNNNN."""
    text = os.fsencode(name).decode("utf-8", errors="backslashreplace")
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _symlink(link: Path, target: Path, directory: bool) -> None:
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target, target_is_directory=directory)


# ------------------------------------------------------------------------------------------ checking
def read_rows(output: Path) -> list[dict]:
    """The rows of a `captioner caption --output x.jsonl` file."""
    if not output.exists():
        return []
    # Split at \n only: a JSON line may hold U+2028, which str.splitlines() also breaks at.
    return [json.loads(line) for line in output.read_text(encoding="utf-8").split("\n") if line.strip()]


def judge(cases: list[Case], rows: list[dict], folder: Path) -> list[tuple[Case, str, bool]]:
    """(case, what it got, as expected?) per case. Each case must appear exactly once, and an error must
    name its file; rows for files outside the corpus (e.g. the symlink loop followed) count as failures."""
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(os.path.relpath(row["image"], folder), []).append(row)
    verdicts = []
    for case in cases:
        found = by_name.pop(case.name, [])
        if len(found) != 1:
            verdicts.append((case, f"{len(found)} result rows (expected exactly 1)", False))
            continue
        row = found[0]
        if row["error"]:
            ok = case.expect_error is not None and case.expect_error in row["error"]
            verdicts.append((case, f"error: {row['error']}", ok))
        else:
            ok = case.expect_error is None and bool(row["caption"])
            verdicts.append((case, f"caption: {row['caption']}", ok))
    for name, extra in by_name.items():
        verdicts.append((Case(name, "not in the corpus"), f"{len(extra)} unexpected result rows", False))
    return verdicts


def format_table(verdicts: list[tuple[Case, str, bool]], width: int = 70) -> str:
    name_width = max(len(shown(case.name)) for case, _, _ in verdicts)
    what_width = max(len(case.what) for case, _, _ in verdicts)
    lines = [f"   {'input':{name_width}}  {'what it is':{what_width}}  result",
             "-" * (name_width + what_width + 7 + width)]
    for case, got, ok in verdicts:
        got = shown(got)
        got = got if len(got) <= width else got[: width - 1] + "…"
        lines.append(f"{'ok' if ok else '!!'} {shown(case.name):{name_width}}  {case.what:{what_width}}  {got}")
    return "\n".join(lines)


def run_batch(folder: Path, checkpoint: Path, output: Path, timeout: float) -> subprocess.CompletedProcess:
    """One `captioner caption --recursive` process over the whole corpus (greedy decoding)."""
    command = [sys.executable, "-m", "captioner", "caption", str(folder), "--recursive", "--checkpoint",
               str(checkpoint), "--output", str(output), "--strategy", "greedy", "--batch-size", "8"]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1])
