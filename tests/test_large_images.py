"""Large photos: JPEGs decoded at reduced scale (draft), the pixel limit on what is decoded, --max-pixels."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import load_script, png_header_only
from PIL import Image

from captioner.apps.cli import main
from captioner.images import DEFAULT_MAX_PIXELS, JPEG_HEADER_FACTOR, ImageLoadError, jpeg_scale, load_image

GREY = (128, 128, 128)


def flat_grey_jpeg(width: int, height: int) -> bytes:
    """A baseline 4:2:0 JPEG of mid-grey pixels, made without holding its pixels in memory.

    Pillow's encoder turns a mid-grey image into identical 4-byte MCUs (every DC and AC coefficient is 0),
    so Pillow's encoding of one 16×16 MCU, with the frame size changed and the MCU repeated, is the file
    Pillow would write for the whole image (checked byte for byte below): a 200-MP JPEG in ~3 MB and
    milliseconds instead of 600 MB and seconds."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), GREY).save(buffer, format="JPEG", quality=90)
    one = buffer.getvalue()
    sof, sos = one.index(b"\xff\xc0"), one.index(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(one[sos + 2:sos + 4], "big")
    mcu = one[scan:one.rindex(b"\xff\xd9")]
    assert mcu == bytes.fromhex("28a28a00"), "Pillow's JPEG encoder changed; rebuild this helper"
    header = bytearray(one[:scan])
    struct.pack_into(">HH", header, sof + 5, height, width)
    count = -(-width // 16) * -(-height // 16)
    return bytes(header) + mcu * count + b"\xff\xd9"


# the photos scripts/bench/large_photos.py measures with
photo_like = load_script("bench/large_photos.py").photo_like


def test_flat_grey_jpeg_is_what_pillow_writes() -> None:
    for size in [(16, 16), (64, 48), (100, 37)]:
        buffer = io.BytesIO()
        Image.new("RGB", size, GREY).save(buffer, format="JPEG", quality=90)
        assert flat_grey_jpeg(*size) == buffer.getvalue()


@pytest.mark.parametrize(
    ("size", "draft_size", "max_pixels", "scale"),
    [
        ((500, 375), 448, DEFAULT_MAX_PIXELS, 1),  # Flickr8k-sized: never reduced
        ((1000, 895), 448, DEFAULT_MAX_PIXELS, 1),  # shorter side under 2 × 448: full decode
        ((1000, 896), 448, DEFAULT_MAX_PIXELS, 2),
        ((4032, 3024), 448, DEFAULT_MAX_PIXELS, 4),  # 1008×756
        ((16320, 12240), 448, DEFAULT_MAX_PIXELS, 8),
        ((8160, 6120), None, DEFAULT_MAX_PIXELS, 2),  # full size asked for, but 50 MP > 40 MP: 1/2
        ((16320, 12240), None, DEFAULT_MAX_PIXELS, 4),  # 200 MP -> 12.5 MP
        ((4032, 3024), None, 1_000_000, 4),
    ],
)
def test_jpeg_scale(size, draft_size, max_pixels, scale) -> None:
    assert jpeg_scale(*size, draft_size, max_pixels) == scale


def test_small_jpegs_decode_to_the_same_pixels_with_draft(tmp_path: Path) -> None:
    """Draft never touches a photo whose shorter side is under twice the draft size (all of Flickr8k's)."""
    rng = np.random.default_rng(0)
    for size in [(500, 375), (1000, 895)]:
        path = tmp_path / f"{size[0]}.jpg"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
        full = np.asarray(load_image(path))
        drafted = np.asarray(load_image(path, draft_size=448))
        assert drafted.shape == full.shape and np.array_equal(drafted, full)


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    photo_like(4032, 3024).save(path, quality=85)
    image = load_image(path, draft_size=448)
    assert image.size == (1008, 756) and image.mode == "RGB"
    assert load_image(path).size == (4032, 3024)
    # EXIF orientation is applied after the reduced decode, as for a full one
    exif = Image.Exif()
    exif[0x0112] = 6
    photo_like(4032, 3024).save(tmp_path / "turned.jpg", quality=85, exif=exif.tobytes())
    assert load_image(tmp_path / "turned.jpg", draft_size=448).size == (756, 1008)


@pytest.fixture(scope="module")
def huge_jpegs(tmp_path_factory) -> dict[str, Path]:
    """A 50-MP photo-like JPEG (Pillow, ~1 s, 150 MB while encoding) and a 200-MP flat one (crafted)."""
    folder = tmp_path_factory.mktemp("huge")
    photo_like(8160, 6120).save(folder / "p50mp.jpg", quality=85)
    (folder / "p200mp.jpg").write_bytes(flat_grey_jpeg(16320, 12240))
    return {"50": folder / "p50mp.jpg", "200": folder / "p200mp.jpg"}


@pytest.mark.slow
def test_50_and_200_megapixel_jpegs_load_under_the_default_limit(huge_jpegs) -> None:
    assert huge_jpegs["200"].stat().st_size < 4 * 2**20
    assert load_image(huge_jpegs["50"]).size == (4080, 3060)  # 1/2: the most that fits 40 MP
    assert load_image(huge_jpegs["50"], draft_size=448).size == (1020, 765)
    drafted = load_image(huge_jpegs["200"], draft_size=448)
    assert drafted.size == (2040, 1530)
    assert np.abs(np.asarray(drafted).astype(int) - 128).max() <= 1
    assert load_image(huge_jpegs["200"]).size == (4080, 3060)  # 1/4 = 12.5 MP
    # the 64× header cap still refuses a JPEG no reduced decode can bring under the limit
    with pytest.raises(ImageLoadError, match="even decoded at reduced scale"):
        load_image(huge_jpegs["200"], max_pixels=199_756_800 // JPEG_HEADER_FACTOR - 1)


@pytest.mark.slow
def test_caption_command_captions_50_and_200_megapixel_jpegs(huge_jpegs, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    status = main(["caption", str(huge_jpegs["50"]), str(huge_jpegs["200"]), "--output", str(output)])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert status == 0, rows
    assert len(rows) == 2 and all(row["caption"] and row["error"] is None for row in rows)


def test_jpeg_header_caps(tmp_path: Path) -> None:
    sequential, progressive = tmp_path / "sequential.jpg", tmp_path / "progressive.jpg"
    photo_like(200, 200).save(sequential, quality=85)
    photo_like(200, 200).save(progressive, quality=85, progressive=True)
    # 40,000 header pixels, limit 5,000: a sequential JPEG is decoded at 1/4 (50×50); a progressive one
    # (over 4× the limit) is refused, its decoder would hold every coefficient of the full image
    assert load_image(sequential, max_pixels=5_000).size == (50, 50)
    with pytest.raises(ImageLoadError, match="progressive JPEG"):
        load_image(progressive, max_pixels=5_000)
    assert load_image(progressive, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageLoadError, match="too many pixels"):
        load_image(sequential, max_pixels=600)  # 40,000 > 64 × 600


def test_png_bomb_is_still_refused_from_its_header(tmp_path: Path) -> None:
    bomb = png_header_only(tmp_path / "bomb.png", 40_000, 40_000)
    assert bomb.stat().st_size < 100
    with pytest.raises(ImageLoadError, match="decompression bomb") as caught:
        load_image(bomb)
    assert "40000×40000" in caught.value.reason
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(bomb, draft_size=448)  # draft is for JPEGs only; a PNG is decoded in full


@pytest.mark.slow
def test_max_pixels_lowers_the_limit_on_the_command_line_and_in_the_api(tmp_path: Path) -> None:
    from captioner import Captioner

    photo = tmp_path / "photo.png"
    photo_like(400, 300).save(photo)
    output = tmp_path / "out.jsonl"
    assert main(["caption", str(photo), "--max-pixels", "100000", "--output", str(output)]) == 1
    row = json.loads(output.read_text())
    assert row["caption"] is None and "too many pixels" in row["error"] and "max_pixels=100,000" in row["error"]

    strict = Captioner.from_pretrained(max_pixels=100_000)
    [refused] = strict.caption(str(photo))
    assert refused.caption is None and "max_pixels=100,000" in refused.error
    strict.max_pixels = 120_000
    assert strict.caption(str(photo))[0].caption


@pytest.mark.slow
def test_max_pixels_raises_the_limit_on_the_command_line(tmp_path: Path) -> None:
    photo = tmp_path / "pano.png"  # 6400×6400 = 40.96 MP: over the default, decoded in full
    photo_like(6400, 6400).save(photo, compress_level=1)
    refused, accepted = tmp_path / "refused.jsonl", tmp_path / "accepted.jsonl"
    assert main(["caption", str(photo), "--output", str(refused)]) == 1
    assert "too many pixels" in json.loads(refused.read_text())["error"]
    assert main(["caption", str(photo), "--max-pixels", "41000000", "--output", str(accepted)]) == 0
    assert json.loads(accepted.read_text())["caption"]


def test_max_pixels_on_every_image_command() -> None:
    from captioner.apps.cli import build_parser

    parser = build_parser()
    for command in (["caption", "x.jpg"], ["demo"], ["features", "--data", "d", "--out", "o"],
                    ["evaluate", "--checkpoint", "c", "--data", "d"]):
        assert parser.parse_args(command).max_pixels == DEFAULT_MAX_PIXELS
        assert parser.parse_args([*command, "--max-pixels", "123"]).max_pixels == 123


@pytest.mark.slow
@pytest.mark.shared_data
def test_reduced_decoding_keeps_features_of_upscaled_photos(flickr8k_dir, tmp_path: Path) -> None:
    """Three Flickr8k photos upscaled to 4032×3024: features from draft decoding agree with full decoding."""
    import torch

    from captioner.encoders import get_encoder
    from captioner.features import encode_images, image_loader

    names = sorted(p.name for p in (flickr8k_dir / "images").iterdir())[:3]
    paths = []
    for name in names:
        with Image.open(flickr8k_dir / "images" / name) as photo:
            photo.convert("RGB").resize((4032, 3024), Image.BICUBIC).save(tmp_path / name, quality=90)
        paths.append(tmp_path / name)
    encoder = get_encoder("efficientnet_lite0")
    drafted = encode_images(paths, encoder).features  # the one route: JPEGs drafted by default
    full = torch.cat([batch.images for batch in image_loader(paths, encoder, draft=False)])
    with torch.inference_mode():
        full_features = encoder.model(full).float()
    cosine = torch.nn.functional.cosine_similarity(drafted, full_features, dim=1)
    assert cosine.min().item() > 0.99, cosine


@pytest.mark.shared_data
def test_flickr8k_test_photos_are_never_drafted(flickr8k_dir) -> None:
    """`captioner evaluate --split test` must not change with draft decoding: no test photo is big enough
    for the shipped encoder's draft size (224 input -> 448) to reduce it."""
    from captioner.encoders import get_encoder
    from captioner.features import jpeg_draft_size

    draft_size = jpeg_draft_size(get_encoder("efficientnet_lite0").preprocessor)
    assert draft_size == 448
    names = (flickr8k_dir / "Flickr_8k.testImages.txt").read_text().split()
    assert len(names) == 1000
    for name in names:
        with Image.open(flickr8k_dir / "images" / name) as image:
            assert jpeg_scale(*image.size, draft_size, DEFAULT_MAX_PIXELS) == 1, (name, image.size)
