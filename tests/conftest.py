"""Shared fixtures. Tests that need ../shared/data/flickr8k (or coco-dev) skip when it is absent, unless
CAPTIONER_REQUIRE_SHARED_DATA=1 (set by .ci/run), in which case its absence is a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import REPO_ROOT, FakeCaptioner

FLICKR8K_DIR = Path(os.environ.get("CAPTIONER_FLICKR8K", REPO_ROOT.parent / "shared" / "data" / "flickr8k"))
COCO_DEV_DIR = Path(os.environ.get("CAPTIONER_COCO_DEV", REPO_ROOT.parent / "shared" / "data" / "coco-dev"))


def skip_without(name: str, folder: Path, variable: str) -> None:
    message = f"{name} data not found at {folder} (set {variable} to its folder); shared-data tests skipped"
    if os.environ.get("CAPTIONER_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(message.replace("skipped", "are required (CAPTIONER_REQUIRE_SHARED_DATA=1)"))
    pytest.skip(message)


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    if not (FLICKR8K_DIR / "dataset_flickr8k.json").is_file():
        skip_without("Flickr8k", FLICKR8K_DIR, "CAPTIONER_FLICKR8K")
    return FLICKR8K_DIR


@pytest.fixture(scope="session")
def coco_dev_dir() -> Path:
    """../shared/data/coco-dev: 100 COCO photos in one captions.json (no split in its name) and images/."""
    if not (COCO_DEV_DIR / "captions.json").is_file():
        skip_without("coco-dev", COCO_DEV_DIR, "CAPTIONER_COCO_DEV")
    return COCO_DEV_DIR


@pytest.fixture(scope="session")
def tiny_flickr8k(flickr8k_dir, tmp_path_factory) -> Path:
    """A Karpathy-format subset of Flickr8k (60 train, 12 val, 12 test images) beside the real images."""
    import json

    full = json.loads((flickr8k_dir / "dataset_flickr8k.json").read_text())
    wanted = {"train": 60, "val": 12, "test": 12}
    images = []
    for image in full["images"]:
        if wanted.get(image["split"], 0) > 0:
            wanted[image["split"]] -= 1
            images.append(image)
    path = tmp_path_factory.mktemp("tiny") / "dataset_tiny.json"
    path.write_text(json.dumps({"dataset": "flickr8k-tiny", "images": images}))
    return path


@pytest.fixture(scope="session")
def tiny_run(tiny_flickr8k, flickr8k_dir, tmp_path_factory) -> dict[str, Path]:
    """Features and a 2-epoch checkpoint for the tiny subset, made through the CLI doors."""
    from captioner.apps.cli import main

    work = tmp_path_factory.mktemp("tiny-run")
    data = ["--data", str(tiny_flickr8k), "--images", str(flickr8k_dir / "images")]
    assert main(["features", *data, "--out", str(work / "features"), "--batch-size", "32"]) == 0
    assert main(["train", *data, "--features", str(work / "features"), "--out", str(work / "run"),
                 "--epochs", "2", "--batch-size", "32", "--min-word-count", "2", "--embed-dim", "64",
                 "--hidden-dim", "64", "--image-dim", "64", "--val-beam-size", "2"]) == 0
    return {"data": tiny_flickr8k, "images": flickr8k_dir / "images", "features": work / "features",
            "checkpoint": work / "run" / "best.safetensors", "run": work / "run"}


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a busy 2-core machine, torch's spinning intra-op threads make
    tiny models ~100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOY_SENTENCES = [
    "a dog runs through the grass",
    "a man in a red shirt rides a bike",
    "two children play in the water",
    "a black cat sits on a wooden chair",
]


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory) -> Path:
    """A tiny decoder trained for a moment on random features, saved for the real EfficientNet-Lite0 encoder:
    real photos get real words out of it, and it needs neither the shipped model nor Flickr8k."""
    import torch
    import torch.nn.functional as F

    from captioner.checkpoint import save_checkpoint
    from captioner.config import ModelConfig
    from captioner.model import CaptionDecoder
    from captioner.text import Vocabulary, tokenize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine, torch's spinning threads make this tiny model crawl
    try:
        tokens = [tokenize(sentence) for sentence in TOY_SENTENCES]
        vocab = Vocabulary.build(tokens, min_count=1)
        config = ModelConfig(vocab_size=len(vocab), feature_dim=1280, embed_dim=32, hidden_dim=64, image_dim=32,
                             dropout=0.0)
        torch.manual_seed(0)
        model = CaptionDecoder(config)
        # Longest caption first, as the model's packing expects. The features are sparse and non-negative,
        # like EfficientNet-Lite0's pooled output.
        order = sorted(range(len(tokens)), key=lambda i: -len(tokens[i]))
        encoded = [vocab.encode(tokens[i]) for i in order]
        lengths = torch.tensor([len(ids) for ids in encoded])
        captions = torch.full((len(encoded), int(lengths.max())), vocab.pad_id, dtype=torch.long)
        for row, ids in enumerate(encoded):
            captions[row, :len(ids)] = torch.tensor(ids)
        features = torch.relu(0.4 * torch.randn(len(encoded), config.feature_dim))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(100):
            logits, targets = model(features, captions, lengths)
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.5, f"the tiny decoder did not learn its captions (loss {loss.item():.2f})"
    return save_checkpoint(tmp_path_factory.mktemp("toy-checkpoint") / "model.safetensors", model, vocab,
                           encoder={"encoder": "efficientnet_lite0"})


@pytest.fixture
def fake_captioner(monkeypatch) -> FakeCaptioner:
    """helpers.FakeCaptioner behind `captioner caption` (Captioner.from_pretrained returns it): the batch door's
    bookkeeping tested without a model."""
    from captioner.api import Captioner

    fake = FakeCaptioner()
    monkeypatch.setattr(Captioner, "from_pretrained", fake.from_pretrained)
    return fake


@pytest.fixture
def tmpfs_mount(tmp_path):
    """`tmpfs_mount(name, size="16k", read_only=False)`: a small real filesystem at tmp_path/name (a full disk
    or a read-only one, for the output-file tests); skipped, with the reason, where mounting is not allowed
    (not root, or a container without the mount capability). Unmounted after the test."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "16k", read_only: bool = False) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a real small or read-only filesystem needs `mount` as root; the simulated case covers it")
        target = tmp_path / name
        target.mkdir()
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                              capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}); the simulated case covers it")
        mounted.append(target)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True, capture_output=True)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], capture_output=True)
