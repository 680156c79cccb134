"""Large photos and special files: what reduced-scale JPEG decoding buys, what it changes, what it costs.

    python scripts/bench/large_photos.py --count 100            # 1. throughput on 4032×3024 photos
    python scripts/bench/large_photos.py --agreement 200        # 2. draft vs full decoding: features, captions
    python scripts/bench/large_photos.py --special              # 3. a 200-MP JPEG; a batch with a named pipe

1. Makes --count photos of 4032×3024 (12 MP, what phones write) by upscaling Flickr8k photos into a
   temporary folder, then times, in the same run, whole commands (start-up and model load included):
   `captioner caption FOLDER` (beam 3) against the textbook path run as its own command: Pillow full
   decode -> RGB -> resize -> CNN -> beam 3, with the same checkpoint, batch size and decoding groups.
   Prints images/s of both and the ratio (target >= 2×), and the loader's own decode+resize time with
   and without draft.
2. Upscales --agreement Flickr8k val photos to 4032×3024 and compares the CNN features and beam-3
   captions from reduced-scale (draft) decoding with those from full decoding: mean and min cosine
   similarity, share of identical captions.
3. Peak RSS (of that process alone, from wait4) and wall time of `captioner caption` on one 200-MP JPEG
   (16320×12240, photo-like, made here with Pillow; target peak RSS <= 1.5 GB), and the wall time of a
   batch of --special-count Flickr8k photos plus one named pipe against the same batch without it
   (target: within 10 %), in alternating rounds.

Photos are made in a temporary folder and deleted afterwards; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

PHONE_SIZE = (4032, 3024)


def flickr_photos(images_dir: Path, count: int, split_file: str | None = None) -> list[Path]:
    if split_file:
        names = (images_dir.parent / split_file).read_text().split()
    else:
        names = sorted(p.name for p in images_dir.iterdir())
    if len(names) < count:
        raise SystemExit(f"{images_dir}: only {len(names)} photos, {count} asked for")
    return [images_dir / name for name in names[:count]]


def upscale(source: Path, target: Path, size: tuple[int, int] = PHONE_SIZE) -> Path:
    """A phone-sized JPEG of a Flickr8k photo (bicubic upscale, quality 90), portrait kept portrait."""
    with Image.open(source) as photo:
        photo = photo.convert("RGB")
        width, height = size if photo.width >= photo.height else size[::-1]
        photo.resize((width, height), Image.BICUBIC).save(target, quality=90)
    return target


# Linux carries a process's peak RSS across fork and exec, so a command started from this (large) process
# would report at least this process's own peak. A bare Python (no site, a few MB) forks it instead and
# reports that child's own figures.
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_command(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of that process alone) of a command, output discarded."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as report:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, report.name, *command],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        seconds = time.perf_counter() - start
        peak_kb, status = map(int, report.read().split())
    if status not in (0, 1):
        raise SystemExit(f"{' '.join(command)} exited with {status}")
    return seconds, peak_kb / 1024


def caption_command(paths: list[str], output: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "captioner", "caption", *paths, "--checkpoint", args.checkpoint, "--strategy",
            "beam", "--beam-size", "3", "--batch-size", str(args.batch_size), "--output", str(output)]


def textbook(folder: Path, output: Path, checkpoint: str, batch_size: int) -> None:
    """The textbook path, as a command of its own: every photo fully decoded by Pillow, converted to RGB and
    resized (the encoder's own antialiased resize), the CNN per batch, beam 3 per group of 128 features."""
    import torch

    from captioner.api import Captioner
    from captioner.config import DecodeConfig
    from captioner.encoders import Preprocessor
    from captioner.features import encode_batch

    captioner = Captioner.from_pretrained(checkpoint, device="cpu")
    preprocessor = captioner.encoder.preprocessor
    paths = sorted(folder.iterdir())
    features = []
    for start in range(0, len(paths), batch_size):
        pixels = []
        for path in paths[start:start + batch_size]:
            with Image.open(path) as image:
                pixels.append(preprocessor.to_pixels(image.convert("RGB")))
        images = preprocessor.normalize(Preprocessor.stack(pixels), channels_last=True)
        features.append(encode_batch(captioner.encoder, images))
    features = torch.cat(features)
    config = DecodeConfig(strategy="beam", beam_size=3)
    with open(output, "w", encoding="utf-8") as out:
        for first in range(0, len(paths), 128):
            captions = captioner.caption_features(features[first:first + 128], config)
            for path, best in zip(paths[first:first + 128], captions, strict=True):
                out.write(json.dumps({"image": str(path), "caption": best[0].text}) + "\n")


def loader_seconds(paths: list[Path], encoder, draft: bool) -> float:
    from captioner.features import image_loader

    start = time.perf_counter()
    for _ in image_loader(paths, encoder, batch_size=32, draft=draft):
        pass
    return time.perf_counter() - start


def bench_throughput(args: argparse.Namespace, tmp: Path) -> None:
    folder = tmp / "phone"
    folder.mkdir()
    start = time.perf_counter()
    for source in flickr_photos(Path(args.images), args.count):
        upscale(source, folder / source.name)
    print(f"made {args.count} photos of {PHONE_SIZE[0]}×{PHONE_SIZE[1]} in {time.perf_counter() - start:.0f} s")

    from captioner.encoders import get_encoder
    from captioner.features import jpeg_draft_size
    from captioner.images import load_image

    encoder = get_encoder("efficientnet_lite0")
    sample = sorted(folder.iterdir())[0]
    print(f"draft size {jpeg_draft_size(encoder.preprocessor)}: {sample.name} decodes to "
          f"{load_image(sample, draft_size=jpeg_draft_size(encoder.preprocessor)).size}")
    paths = sorted(folder.iterdir())
    print(f"loader alone (decode + resize, {args.count} photos): draft {loader_seconds(paths, encoder, True):.1f} s, "
          f"full decode {loader_seconds(paths, encoder, False):.1f} s")

    ours, plain = [], []
    for number in range(args.rounds):
        seconds, _ = run_command(caption_command([str(folder)], tmp / f"ours{number}.jsonl", args))
        ours.append(args.count / seconds)
        seconds, _ = run_command([sys.executable, __file__, "--textbook-worker", str(folder),
                                  str(tmp / f"textbook{number}.jsonl"), "--checkpoint", args.checkpoint,
                                  "--batch-size", str(args.batch_size)])
        plain.append(args.count / seconds)
    rows = [json.loads(line) for line in open(tmp / "ours0.jsonl", encoding="utf-8")]
    assert len(rows) == args.count and all(row["caption"] for row in rows), "captioner caption failed on some photos"
    ratios = [a / b for a, b in zip(ours, plain, strict=True)]
    print(f"captioner caption (whole command): {statistics.median(ours):.1f} images/s")
    print(f"textbook path (whole command):     {statistics.median(plain):.1f} images/s")
    print(f"ratio: {statistics.median(ratios):.2f}× (target >= 2×; {args.rounds} round(s), "
          f"range {min(ratios):.2f}-{max(ratios):.2f})")


def bench_agreement(args: argparse.Namespace, tmp: Path) -> None:
    import torch

    from captioner.api import Captioner
    from captioner.config import DecodeConfig
    from captioner.features import encode_batch, encode_images, image_loader

    captioner = Captioner.from_pretrained(args.checkpoint, device="cpu")
    config = DecodeConfig(strategy="beam", beam_size=3)
    sources = flickr_photos(Path(args.images), args.agreement, "Flickr_8k.devImages.txt")
    cosines, same, sizes = [], 0, set()
    for first in range(0, len(sources), 25):  # 25 at a time, so the temporary folder stays small
        paths = [upscale(source, tmp / source.name) for source in sources[first:first + 25]]
        encoded = encode_images(paths, captioner.encoder)
        drafted = encoded.features
        assert not encoded.failures, encoded.failures
        full = torch.cat([encode_batch(captioner.encoder, batch.images)
                          for batch in image_loader(paths, captioner.encoder, draft=False)])
        cosines += torch.nn.functional.cosine_similarity(drafted, full, dim=1).tolist()
        for a, b in zip(captioner.caption_features(drafted, config), captioner.caption_features(full, config),
                        strict=True):
            same += a[0].text == b[0].text
        sizes.update(Image.open(path).size for path in paths)
        for path in paths:
            path.unlink()
    print(f"{len(sources)} Flickr8k val photos upscaled to {' / '.join(f'{w}×{h}' for w, h in sorted(sizes))}, "
          "draft vs full decoding:")
    print(f"feature cosine similarity: mean {statistics.fmean(cosines):.4f}, min {min(cosines):.4f}")
    print(f"identical beam-3 captions: {same} of {len(sources)} ({100 * same / len(sources):.1f} %)")


def photo_like(width: int, height: int) -> Image.Image:
    """Mostly flat (small when encoded), with a sky, a field and a sun, so it is not a blank test card."""
    image = Image.new("RGB", (width, height), (90, 140, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, height * 2 // 3, width, height), fill=(60, 120, 40))
    draw.ellipse((width * 3 // 8, height // 4, width * 5 // 8, height // 4 + width // 4), fill=(250, 220, 60))
    return image


def bench_special(args: argparse.Namespace, tmp: Path) -> None:
    big = tmp / "p200mp.jpg"
    photo_like(16320, 12240).save(big, quality=85)
    print(f"made {big.name}: 16320×12240 ({16320 * 12240 / 1e6:.1f} MP), {big.stat().st_size / 2**20:.1f} MiB")
    seconds, peak_mb = run_command(caption_command([str(big)], tmp / "big.jsonl", args))
    row = json.loads((tmp / "big.jsonl").read_text())
    print(f"captioner caption on one 200-MP JPEG: {seconds:.1f} s, peak RSS {peak_mb:.0f} MB (target <= 1536 MB); "
          f"caption: {row['caption']!r}")
    small = Path(args.images) / sorted(os.listdir(args.images))[0]
    seconds, peak_mb = run_command(caption_command([str(small)], tmp / "small.jsonl", args))
    print(f"  for scale, the same on one {'×'.join(map(str, Image.open(small).size))} photo: {seconds:.1f} s, "
          f"peak RSS {peak_mb:.0f} MB")
    if not args.special_count:
        return

    good, mixed = tmp / "good", tmp / "mixed"
    good.mkdir()
    mixed.mkdir()
    for source in flickr_photos(Path(args.images), args.special_count):
        (good / source.name).symlink_to(source.resolve())
        (mixed / source.name).symlink_to(source.resolve())
    os.mkfifo(mixed / "fifo.jpg")
    times: dict[str, list[float]] = {"without": [], "with": []}
    for number in range(args.rounds):
        pair = [("without", good), ("with", mixed)]
        for name, folder in pair if number % 2 == 0 else pair[::-1]:  # which goes first alternates
            output = tmp / f"{name}{number}.jsonl"
            seconds, _ = run_command(caption_command([str(folder)], output, args))
            rows = [json.loads(line) for line in open(output, encoding="utf-8")]
            assert sum(1 for row in rows if row["caption"]) == args.special_count, "a good photo was not captioned"
            times[name].append(seconds)
    without, with_fifo = statistics.median(times["without"]), statistics.median(times["with"])
    changes = [100 * (b / a - 1) for a, b in zip(times["without"], times["with"], strict=True)]
    print(f"{args.special_count} photos: {without:.2f} s; the same plus a named pipe: {with_fifo:.2f} s "
          f"({100 * (with_fifo / without - 1):+.1f} %, target within 10 %; median of {args.rounds} alternating rounds; "
          f"per round {', '.join(f'{c:+.1f} %' for c in changes)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/flickr8k-cocotext-lite0")
    parser.add_argument("--images", default="../shared/data/flickr8k/images")
    parser.add_argument("--count", type=int, default=100, help="phone-sized photos for the throughput figures")
    parser.add_argument("--agreement", type=int, default=0, metavar="N",
                        help="compare draft and full decoding on N upscaled Flickr8k val photos")
    parser.add_argument("--special", action="store_true", help="the 200-MP JPEG and named-pipe figures")
    parser.add_argument("--special-count", type=int, default=50,
                        help="good photos in the named-pipe batch (0: skip that part)")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput figures")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--textbook-worker", nargs=2, metavar=("FOLDER", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.textbook_worker:
        textbook(Path(args.textbook_worker[0]), Path(args.textbook_worker[1]), args.checkpoint, args.batch_size)
        return

    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_throughput:
            bench_throughput(args, Path(tmp))
        if args.agreement:
            bench_agreement(args, Path(tmp))
        if args.special:
            bench_special(args, Path(tmp))


if __name__ == "__main__":
    main()
