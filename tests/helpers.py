"""Helpers shared by several test files (tests never import one another; fixtures live in conftest.py).

Library imports stay inside the functions, so that a test file importing one helper does not depend on
every library module the others need.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]

CAPTION_WORDS = ["dog", "cat", "man", "woman", "runs", "sits", "on", "the", "grass", "beach", "red", "blue"]


def load_script(relative_path: str) -> ModuleType:
    """A script under scripts/ loaded by path, for the tests of that script (scripts/ is not a package).
    Loaded once per session, registered in sys.modules (dataclasses look their module up there)."""
    path = REPO_ROOT / "scripts" / relative_path
    module_name = "scripts." + relative_path.removesuffix(".py").replace("/", ".")
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG of a few dozen bytes whose header declares width × height 8-bit RGB pixels (a decompression
    bomb's header, without its pixels)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def decoder_batch(vocab_size=40, batch=5, lengths=(7, 6, 6, 4, 3), feature_dim=16, seed=0):
    """A teacher-forcing batch (features, captions, lengths): ids 1 = <start>, 2 = <end>, 0 = padding,
    captions longest first, as the decoder's packing expects."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    captions = torch.randint(4, vocab_size, (batch, int(lengths.max())), generator=generator)
    captions[:, 0] = 1
    for row, length in enumerate(lengths):
        captions[row, length - 1] = 2
        captions[row, length:] = 0
    return torch.randn(batch, feature_dim, generator=generator), captions, lengths


def random_caption_records(count: int, split: str, seed: int, feature_dim: int = 16):
    """`count` CaptionRecords with three random 6-word captions over CAPTION_WORDS, and random features
    (count, feature_dim): a dataset a tiny decoder can overfit in a few epochs."""
    import torch

    from captioner.data.records import CaptionRecord

    generator = torch.Generator().manual_seed(seed)
    records = []
    for i in range(count):
        picks = torch.randint(0, len(CAPTION_WORDS), (3, 4), generator=generator).tolist()
        captions = [f"a {' '.join(CAPTION_WORDS[j] for j in row)} ." for row in picks]
        records.append(CaptionRecord(f"{split}{i}.jpg", f"/nowhere/{split}{i}.jpg", captions, split))
    return records, torch.randn(count, feature_dim, generator=generator)


def train_on_random_captions(out_dir: Path, device, amp: str | None = None, epochs: int = 4):
    """A small training run on random captions (48 train, 8 val): (best checkpoint path, log entries)."""
    from captioner.config import DecodeConfig, ModelConfig, TrainConfig
    from captioner.train import LOG, train

    train_records, train_features = random_caption_records(48, "train", 0)
    val_records, val_features = random_caption_records(8, "val", 1)
    config = TrainConfig(epochs=epochs, batch_size=16, lr=5e-3, warmup_steps=2, min_word_count=1, patience=10,
                         seed=3, val_decode=DecodeConfig(strategy="beam", beam_size=2, max_length=8))
    model = ModelConfig(embed_dim=16, hidden_dim=24, image_dim=16, dropout=0.0)
    best = train(train_records, train_features, val_records, val_features, out_dir, model, config,
                 encoder={"encoder": "test"}, progress=False, device=device, amp=amp)
    return best, [json.loads(line) for line in (Path(out_dir) / LOG).read_text().splitlines()]


def synthetic_training_data(folder: Path, counts=(("train", 24), ("val", 4), ("test", 4)), feature_dim: int = 16,
                            seed: int = 0) -> dict[str, Path]:
    """What `captioner train` reads, without photos or a CNN: a Karpathy json over empty image files (the
    readers only look the files up) with random captions over CAPTION_WORDS, and a feature cache of random
    features for them (encoder "test", weights hash "synthetic"). Returns {"data", "images", "features"}."""
    import numpy as np

    from captioner.features.cache import FORMAT_VERSION, write_cache

    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for split, count in counts:
        for i in range(count):
            name = f"{split}{i}.jpg"
            (images_dir / name).touch()
            sentences = [{"raw": "a " + " ".join(rng.choice(CAPTION_WORDS, 4)) + " ."} for _ in range(3)]
            entries.append({"filename": name, "imgid": len(entries), "split": split, "sentences": sentences})
    data = folder / "dataset_synthetic.json"
    data.write_text(json.dumps({"dataset": "synthetic", "images": entries}))
    fingerprint = {"format_version": FORMAT_VERSION, "encoder": "test", "feature_dim": feature_dim, "dtype": "float16",
                   "preprocessing": {}, "weights_hash": "synthetic"}
    features = folder / "features"
    features.mkdir(exist_ok=True)
    rows = rng.normal(size=(len(entries), feature_dim)).astype(np.float16)

    class Source:  # what write_cache records of the encoder
        weights_source = "synthetic"

    write_cache(features, rows, [entry["filename"] for entry in entries], [], fingerprint, Source())
    return {"data": data, "images": images_dir, "features": features}


def train_argv(data: dict[str, Path], out: Path, *extra: str, epochs: int = 2, dim: int | None = 8) -> list[str]:
    """`captioner train` over `synthetic_training_data`, with a decoder small enough to train in a moment
    (`dim`: its sizes; None: no shape flags, as a warm start needs)."""
    shape = [] if dim is None else ["--embed-dim", str(dim), "--hidden-dim", str(dim), "--image-dim", str(dim)]
    return ["train", "--data", str(data["data"]), "--features", str(data["features"]), "--out", str(out),
            "--epochs", str(epochs), "--batch-size", "16", "--min-word-count", "1", *shape, "--val-beam-size", "1",
            *extra]


class FakeCaptioner:
    """Stands in for `Captioner` in tests of the batch door's bookkeeping (inputs, resume, output files):
    `stream` captions a file whose bytes start with b"photo" as "a photo of <its name>" and gives any other
    file the error "not an image", in groups of `decode_batch_size`; no model runs. A file starting with
    b"stall" is captioned too, after `stall_seconds` (time to interrupt the run). `from_pretrained` returns
    the instance, so `monkeypatch.setattr(Captioner, "from_pretrained", fake.from_pretrained)` puts it behind
    the `captioner caption` command."""

    def __init__(self, caption_prefix: str = "a photo of ", stall_seconds: float = 0.0) -> None:
        self.caption_prefix = caption_prefix
        self.stall_seconds = stall_seconds
        self.seen: list[str] = []  # every path streamed, in order

    def from_pretrained(self, *args, **kwargs) -> FakeCaptioner:
        return self

    def stream(self, paths, config, *, batch_size=32, decode_batch_size=None, num_workers=None):
        import time

        from captioner.decoding import Caption
        from captioner.pipeline import ImageCaptions

        group_size = decode_batch_size or batch_size
        group = []
        for index, path in enumerate(paths):
            self.seen.append(path)
            try:
                with open(path, "rb") as handle:
                    start = handle.read(5)
            except OSError as error:
                group.append(ImageCaptions(index, error=f"cannot open file ({error.strerror})"))
            else:
                if start == b"stall":
                    time.sleep(self.stall_seconds)
                text = self.caption_prefix + Path(path).stem
                group.append(ImageCaptions(index, [Caption(text, -1.5, -0.75, True)] * config.n_best)
                             if start in (b"photo", b"stall") else ImageCaptions(index, error="not an image"))
            if len(group) == group_size:
                yield group
                group = []
        if group:
            yield group
