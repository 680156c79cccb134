"""load_image: odd modes become sensible RGB, odd files fail with the file named and the reason."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import png_header_only
from PIL import Image, ImageFile

from captioner.images import ImageLoadError, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return image.getpixel(xy)


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def noise(size: tuple[int, int] = (256, 256)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------- modes


def test_rgb_jpeg_path_str_bytes_and_pil(tmp_path: Path) -> None:
    path = tmp_path / "red.jpg"
    Image.new("RGB", (30, 20), RED).save(path)
    for source in (path, str(path), path.read_bytes(), Image.open(path)):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (30, 20)
        assert close_to(pixel(image, (15, 10)), RED)


def test_decoded_file_is_returned_usable_after_its_file_is_closed(tmp_path: Path) -> None:
    # an RGB JPEG from a path or bytes comes back as decoded (no copy): it must not be a closed image
    path = tmp_path / "noise.jpg"
    noise((64, 48)).save(path, quality=95)
    expected = np.asarray(Image.open(path).convert("RGB"))
    for source in (path, path.read_bytes()):
        image = load_image(source)
        assert np.array_equal(np.asarray(image), expected)
        assert image.resize((16, 16), Image.BILINEAR).size == (16, 16)
    # a PIL image given by the caller is copied, never handed back
    given = Image.open(path)
    given.load()
    assert load_image(given) is not given


def test_grayscale_and_bilevel(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "bilevel.png")
    grey = load_image(tmp_path / "grey.png")
    assert grey.mode == "RGB" and pixel(grey, (3, 3)) == (77, 77, 77)
    assert pixel(load_image(tmp_path / "bilevel.png"), (0, 0)) == WHITE


def test_palette_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # index 0 black, index 1 red
    image.paste(1, (0, 0, 5, 10))  # left half red, right half index 0
    image.info["transparency"] = 0  # index 0 transparent
    image.save(tmp_path / "palette.png", transparency=0)
    image.save(tmp_path / "palette.gif", transparency=0)
    for name in ("palette.png", "palette.gif"):
        loaded = load_image(tmp_path / name)
        assert loaded.mode == "RGB"
        assert pixel(loaded, (2, 5)) == RED
        assert pixel(loaded, (8, 5)) == WHITE, name  # transparent, not black


def test_rgba_and_la_alpha_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 5, 10))
    rgba.paste((0, 0, 255, 128), (5, 0, 10, 5))
    rgba.save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png")
    assert pixel(loaded, (2, 2)) == RED
    assert close_to(pixel(loaded, (7, 2)), (127, 127, 255), 2)  # half-transparent blue over white
    assert pixel(loaded, (7, 7)) == WHITE  # fully transparent (its hidden colour is red)
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert pixel(load_image(tmp_path / "la.png"), (1, 1)) == WHITE


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    loaded = load_image(tmp_path / "cmyk.jpg")
    assert loaded.mode == "RGB" and close_to(pixel(loaded, (8, 8)), RED, 20)


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    reopened = Image.open(tmp_path / "deep.png")
    assert reopened.mode in ("I;16", "I")  # really stored as 16-bit
    loaded = load_image(tmp_path / "deep.png")
    row = [pixel(loaded, (x, 0))[0] for x in range(4)]
    assert row == [0, 4, 128, 255]  # 1000/257 ≈ 4: a clip would give 255


def test_float_and_int_modes() -> None:
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert [pixel(load_image(as_float), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    as_int = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32), mode="I")  # stretched min..max
    low, middle, high = (pixel(load_image(as_int), (x, 0))[0] for x in range(3))
    assert (low, high) == (0, 255) and middle in (127, 128)


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (12, 12), colour) for colour in (RED, BLUE, (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    assert close_to(pixel(load_image(tmp_path / "anim.gif"), (6, 6)), RED)


def test_exif_orientation_6_gives_the_upright_image(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # stored: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)  # portrait once rotated
    assert close_to(pixel(upright, (10, 5)), RED)  # stored left edge is now the top
    assert close_to(pixel(upright, (10, 35)), BLUE)


def test_input_pil_image_is_not_modified() -> None:
    original = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    load_image(original)
    assert original.mode == "RGBA" and original.getpixel((0, 0)) == (0, 0, 0, 0)


# ---------------------------------------------------------------------------------------- errors


def expect_error(source, reason_part: str, **kwargs) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as caught:
        load_image(source, **kwargs)
    error = caught.value
    assert isinstance(error, ValueError)
    assert reason_part in error.reason, error.reason
    if isinstance(source, (str, Path)):
        assert error.path == str(source)
        assert str(source) in str(error) and error.reason in str(error)
    return error


def test_missing_file_and_directory(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.jpg", "file not found")
    expect_error(tmp_path, "directory")


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.jpg"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # running as root: simulate the refusal instead
            real_open = os.open

            def refuse(file, *args, **kwargs):
                if os.fspath(file) == str(path):
                    raise PermissionError(13, "Permission denied", str(path))
                return real_open(file, *args, **kwargs)

            monkeypatch.setattr(os, "open", refuse)
        expect_error(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_zero_byte_file_and_bytes(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    expect_error(tmp_path / "empty.jpg", "empty")
    expect_error(b"", "empty")


@pytest.mark.parametrize(
    ("content", "described"),
    [
        (b"A photo of a dog, honest.\nSecond line.\n", "text"),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", "PDF"),
        (bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)), "binary"),
    ],
)
def test_not_an_image(tmp_path: Path, content: bytes, described: str) -> None:
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    error = expect_error(path, "not an image")
    assert described in error.reason


@pytest.mark.parametrize("extension", ["jpg", "png"])
def test_truncated_file(tmp_path: Path, extension: str) -> None:
    path = tmp_path / f"cut.{extension}"
    noise().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "truncated")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_decompression_bomb_header_is_refused(tmp_path: Path) -> None:
    limit_before, filters_before = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    bomb = png_header_only(tmp_path / "bomb.png", 50_000, 50_000)
    assert bomb.stat().st_size < 100
    expect_error(bomb, "too many pixels")
    # Above our limit (40M) but below PIL's own: refused from the header, before any decoding.
    big = png_header_only(tmp_path / "big.png", 8_000, 6_000)
    error = expect_error(big, "too many pixels")
    assert "8000×6000" in error.reason
    expect_error(png_header_only(tmp_path / "small.png", 100, 100), "too many pixels", max_pixels=5_000)
    assert Image.MAX_IMAGE_PIXELS == limit_before and warnings.filters == filters_before  # nothing global changed


def test_bytes_errors_are_named() -> None:
    error = expect_error(b"hello world", "not an image")
    assert error.path.startswith("<") and "bytes" in error.path
    good = io.BytesIO()
    Image.new("RGB", (5, 5), BLUE).save(good, format="PNG")
    assert pixel(load_image(good.getvalue()), (2, 2)) == BLUE


# ------------------------------------------------------------------------------------------ HEIC/HEIF
def save_heif(image: Image.Image, path: Path, **options) -> Path:
    pillow_heif = pytest.importorskip("pillow_heif")
    heif = pillow_heif.from_pillow(image)
    heif.save(path, quality=90, **options)
    return path


def left_red_right_blue(size: tuple[int, int] = (64, 32)) -> Image.Image:
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, size[0] // 2, size[1]))
    return image


def test_heic_photo_loads(tmp_path: Path) -> None:
    path = save_heif(left_red_right_blue(), tmp_path / "IMG_0001.HEIC")
    assert path.read_bytes()[4:12] == b"ftypheic"
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (64, 32)
    assert close_to(pixel(image, (4, 16)), RED, 40) and close_to(pixel(image, (60, 16)), BLUE, 40)
    assert load_image(path.read_bytes()).size == (64, 32)  # as bytes too (the demo's and the API's way)


def test_heic_orientation_is_applied_like_jpeg(tmp_path: Path) -> None:
    """An iPhone held upright stores the sensor's landscape pixels and a rotation; both formats come out
    upright, the same way round."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    source = left_red_right_blue()
    heic = tmp_path / "turned.heic"
    _heif_writer()
    source.save(heic, format="HEIF", exif=exif.tobytes())
    source.save(tmp_path / "turned.jpg", exif=exif.tobytes())
    from_heic, from_jpeg = load_image(heic), load_image(tmp_path / "turned.jpg")
    assert from_heic.size == from_jpeg.size == (32, 64)
    for xy in [(16, 4), (16, 60)]:  # red on top, blue below
        assert close_to(pixel(from_heic, xy), pixel(from_jpeg, xy), 40)
    assert close_to(pixel(from_heic, (16, 4)), RED, 40) and close_to(pixel(from_heic, (16, 60)), BLUE, 40)


def _heif_writer() -> bool:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()  # for Image.save(format="HEIF") in this test only
    return True


def test_heif_support_is_registered_lazily(tmp_path: Path) -> None:
    """`import captioner` and JPEG loading leave pillow-heif unimported; the first HEIC file imports it."""
    import subprocess
    import sys

    heic = save_heif(left_red_right_blue(), tmp_path / "a.heic")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.jpg")
    script = (
        "import sys, captioner\n"
        "from captioner.images import load_image\n"
        f"load_image({str(tmp_path / 'b.jpg')!r})\n"
        "assert 'pillow_heif' not in sys.modules\n"
        f"print(load_image({str(heic)!r}).size)\n"
        "assert 'pillow_heif' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(64, 32)"
    # without pillow-heif, a HEIC file is named as an image we cannot read, with the fix
    script = ("import sys\nsys.modules['pillow_heif'] = None\n"
              "from captioner.images import ImageLoadError, load_image\n"
              f"try:\n    load_image({str(heic)!r})\nexcept ImageLoadError as error:\n    print(error.reason)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "an image in a format we cannot read (HEIC/HEIF; install pillow-heif to read it)"


def test_heic_files_are_found_in_folders(tmp_path: Path) -> None:
    from captioner.apps.inputs import expand_inputs

    for name in ("a.heic", "b.HEIF", "c.avif", "d.jpg", "e.txt"):
        (tmp_path / name).write_bytes(b"x")
    paths, _ = expand_inputs([str(tmp_path)])
    assert [Path(p).name for p in paths] == ["a.heic", "b.HEIF", "c.avif", "d.jpg"]


def test_avif_still_loads_after_heif_registration(tmp_path: Path) -> None:
    save_heif(left_red_right_blue(), tmp_path / "a.heic")
    load_image(tmp_path / "a.heic")
    avif = tmp_path / "b.avif"
    try:
        left_red_right_blue().save(avif)
    except (KeyError, OSError):
        pytest.skip("this Pillow cannot write AVIF")
    assert close_to(pixel(load_image(avif), (4, 16)), RED, 40)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff\x0a\xfa\x7f\x01\x90\x08" + bytes(64), "an image in a format we cannot read (JPEG XL)"),
        (b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(64), "an image in a format we cannot read (JPEG XL)"),
        (b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom" + bytes(64), "Canon CR3 raw photo"),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(64), "not an image: looks like a video"),
        (b"PK\x03\x04\x14\x00\x00\x00" + bytes(64), "not an image: looks like a ZIP archive"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10"/>', "format we cannot read (SVG vector drawing)"),
        (b"%PDF-1.7\n" + bytes(64), "not an image: looks like a PDF document"),
    ],
)
def test_unreadable_files_are_named(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    assert reason in expect_error(path, "").reason
