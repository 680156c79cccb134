"""Shared fixtures. Tests that need ../shared/data/flickr8k skip when it is absent, unless
CAPTIONER_REQUIRE_SHARED_DATA=1 (set by .ci/run), in which case its absence is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FLICKR8K_DIR = Path(os.environ.get("CAPTIONER_FLICKR8K", REPO_ROOT.parent / "shared" / "data" / "flickr8k"))


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    if not (FLICKR8K_DIR / "dataset_flickr8k.json").is_file():
        message = (f"Flickr8k data not found at {FLICKR8K_DIR} (set CAPTIONER_FLICKR8K to its folder); "
                   "shared-data tests skipped")
        if os.environ.get("CAPTIONER_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message.replace("skipped", "are required (CAPTIONER_REQUIRE_SHARED_DATA=1)"))
        pytest.skip(message)
    return FLICKR8K_DIR


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
    from captioner.cli import main

    work = tmp_path_factory.mktemp("tiny-run")
    data = ["--data", str(tiny_flickr8k), "--images", str(flickr8k_dir / "images")]
    assert main(["features", *data, "--out", str(work / "features"), "--batch-size", "32"]) == 0
    assert main(["train", *data, "--features", str(work / "features"), "--out", str(work / "run"),
                 "--epochs", "2", "--batch-size", "32", "--min-word-count", "2", "--embed-dim", "64",
                 "--hidden-dim", "64", "--image-dim", "64", "--val-beam-size", "2"]) == 0
    return {"data": tiny_flickr8k, "images": flickr8k_dir / "images", "features": work / "features",
            "checkpoint": work / "run" / "best.safetensors", "run": work / "run"}
