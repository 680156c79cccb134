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
