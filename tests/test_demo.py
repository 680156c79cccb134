"""The web demo: `predict` called directly, then the real page driven in Debian's Chromium.

The checkpoint is conftest's `toy_checkpoint` (a tiny decoder trained for a moment on random features), so
these tests need neither the shipped model nor Flickr8k; the encoder is the real offline EfficientNet-Lite0.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from captioner.apps.demo import (
    EXAMPLES_DIR,
    BatchedPredictor,
    CaptionRequest,
    build_app,
    example_paths,
    predict,
    predict_batch,
    serve,
)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# gradio's queue calls pandas APIs that pandas 3 deprecates; not ours to fix. slow: the toy captioner (the
# real CNN) is a module-wide cost, and the browser test starts Chromium.
pytestmark = [pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
              pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
README_SCREENSHOT = REPO_ROOT / "docs" / "demo.png"


@pytest.fixture(scope="module")
def captioner(toy_checkpoint, one_torch_thread):
    from captioner.api import Captioner

    return Captioner.from_pretrained(toy_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def page_captioner(captioner):
    """The shipped model when it is there (what users see, and a real README screenshot), else the tiny one."""
    from captioner.api import Captioner
    from captioner.checkpoint import CheckpointError, default_checkpoint_path, resolve

    try:
        shipped = resolve(default_checkpoint_path())
    except CheckpointError:  # not installed with this checkout
        return captioner
    return Captioner.from_pretrained(shipped, device="cpu") if shipped.is_file() else captioner


@pytest.fixture(scope="module")
def example() -> Path:
    paths = example_paths()
    assert paths, f"no example photos in {EXAMPLES_DIR}"
    return paths[0]


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR declares width × height RGB pixels (the image data is far too short)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------------------------ predict()
@pytest.mark.parametrize("strategy, n_best", [("beam", 3), ("sample", 4), ("greedy", 1)])
def test_predict_captions_an_example(captioner, example, strategy, n_best):
    markdown, rows = predict(captioner, str(example), strategy=strategy, beam_size=3, temperature=1.0,
                             seed=0, n_best=n_best)
    assert markdown.startswith("## ") and len(markdown.splitlines()[0]) > 3, markdown
    assert len(rows) == n_best
    assert [row[0] for row in rows] == list(range(1, n_best + 1))
    assert all(row[1].strip() and row[2] <= 0 for row in rows), rows
    if strategy == "beam":
        assert [row[3] for row in rows] == sorted((row[3] for row in rows), reverse=True)


def test_predict_sampling_is_seeded(captioner, example):
    first = predict(captioner, str(example), strategy="sample", seed=7, n_best=2, temperature=1.5)
    assert predict(captioner, str(example), strategy="sample", seed=7, n_best=2, temperature=1.5) == first


def test_predict_adjusts_n_best_to_the_strategy(captioner, example):
    markdown, rows = predict(captioner, str(example), strategy="beam", beam_size=2, n_best=5)
    assert len(rows) == 2 and "at most 2 captions" in markdown
    markdown, rows = predict(captioner, str(example), strategy="greedy", n_best=3)
    assert len(rows) == 1 and "exactly one caption" in markdown


def test_predict_explains_bad_uploads(captioner, tmp_path):
    text_file = tmp_path / "holiday.jpg"
    text_file.write_text("these are my holiday notes, not a photo\n")
    bomb = _png_header_only(tmp_path / "huge.png", 50_000, 50_000)
    just_too_many = _png_header_only(tmp_path / "big.png", 8_000, 6_000)  # 48 Mpixel: over our 40
    too_large = tmp_path / "large.jpg"
    with open(too_large, "wb") as handle:  # sparse: 21 MB on paper, nothing on disk
        handle.truncate(21 * 1024 * 1024)
    expected = {text_file: "not an image", bomb: "too many pixels", just_too_many: "too many pixels",
                too_large: "too large"}
    for path, words in expected.items():
        markdown, rows = predict(captioner, str(path), strategy="beam", n_best=2)
        assert rows == []
        assert markdown.startswith("### ⚠️") and words in markdown.replace("\\", ""), (path.name, markdown)
        assert "Traceback" not in markdown and str(tmp_path) not in markdown.replace("\\", "")
    markdown, rows = predict(captioner, None)
    assert rows == [] and "Upload a photo" in markdown


# ------------------------------------------------------------------------------- batched requests
class CountingModule(torch.nn.Module):
    """The CNN, noting the size of every batch it is given (its ImageNet head stays reachable for concepts)."""

    def __init__(self, cnn: torch.nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.cnn, self.sizes = cnn, sizes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(images))
        return self.cnn(images)


def test_predict_batch_answers_each_request_as_predict_does_with_one_cnn_batch(captioner, example, tmp_path,
                                                                                monkeypatch):
    photos = example_paths()
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("not a photo")
    requests = [CaptionRequest(str(photos[0]), "greedy", 1, 1.0, 0, 1),
                CaptionRequest(str(photos[1 % len(photos)]), "beam", 3, 1.0, 0, 3),
                CaptionRequest(str(not_a_photo), "greedy", 1, 1.0, 0, 1),
                CaptionRequest(str(photos[2 % len(photos)]), "greedy", 1, 1.0, 0, 1),
                CaptionRequest(str(example), "sample", 3, 1.5, 7, 2),
                CaptionRequest(str(example), "sample", 3, 1.5, 7, 2),
                CaptionRequest(str(photos[-1]), "beam", 3, 1.0, 0, 3),
                CaptionRequest(None)]
    alone = [predict(captioner, r.image_path, r.strategy, r.beam_size, r.temperature, r.seed, r.n_best)
             for r in requests]

    cnn_batches, decoder_calls = [], []
    caption_features = type(captioner).caption_features
    monkeypatch.setattr(captioner.encoder, "model", CountingModule(captioner.encoder.model, cnn_batches))
    monkeypatch.setattr(type(captioner), "caption_features", lambda self, features, config: decoder_calls.append(
        (config.strategy, len(features))) or caption_features(self, features, config))
    together = predict_batch(captioner, requests)
    assert together == alone  # batch-mates change nothing, seeded samples included
    assert cnn_batches == [6]  # every usable photo in one CNN batch
    # one decoder call per setting: greedy ×2, beam ×2, and each sampling request alone
    assert sorted(decoder_calls) == [("beam", 2), ("greedy", 2), ("sample", 1), ("sample", 1)]
    assert together[2][1] == [] and "not an image" in together[2][0].replace("\\", "")


def test_a_full_demo_says_busy_instead_of_failing(captioner, example):
    predictor = BatchedPredictor(captioner, max_batch_size=2, max_pending=1)
    release, entered = threading.Event(), threading.Event()
    serve_batch = predictor.batcher.handle_batch

    def slow(requests):
        entered.set()
        release.wait(30)
        return serve_batch(requests)

    predictor.batcher.handle_batch = slow
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(predictor, str(example), "greedy", 1, 1.0, 0, 1)
        assert entered.wait(30)
        markdown, rows = predictor(str(example), "greedy", 1, 1.0, 0, 1)
        release.set()
        assert first.result(30) == predict(captioner, str(example), "greedy", 1, 1.0, 0, 1)
    assert rows == [] and markdown.startswith("### ⚠️ The demo is busy") and "try again" in markdown.lower()
    assert "Traceback" not in markdown


def test_app_door_passes_its_arguments_to_launch(monkeypatch):
    import importlib.util

    import captioner.apps.demo

    calls = []
    monkeypatch.setattr(captioner.apps.demo, "launch", lambda *args, **kwargs: calls.append((args, kwargs)))
    spec = importlib.util.spec_from_file_location("demo_app", REPO_ROOT / "demo" / "app.py")
    door = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(door)
    from captioner.apps.cli import main
    from captioner.config import DecodeConfig, RerankConfig
    from captioner.images import DEFAULT_MAX_PIXELS

    # demo/app.py is `captioner demo`: the same entry point, so the same flags (the --rerank-* ones too)
    assert door.main(["--checkpoint", "ck.safetensors", "--port", "7999", "--memory", "m.safetensors",
                      "--rerank-candidates", "8"]) == 0
    assert door.main([]) == 0
    limit = DEFAULT_MAX_PIXELS
    assert calls == [(("ck.safetensors",), {"host": "127.0.0.1", "port": 7999, "share": False, "memory": "m.safetensors",
                                            "rerank": RerankConfig(candidates=8), "max_pixels": limit,
                                            "decoding": DecodeConfig()}),
                     ((None,), {"host": "127.0.0.1", "port": 7860, "share": False, "memory": None, "rerank": None,
                                "max_pixels": limit, "decoding": DecodeConfig()})]
    calls.clear()
    assert main(["demo", "--checkpoint", "ck.safetensors", "--memory", "m.safetensors", "--rerank-candidates", "8"]) == 0
    assert calls[0][1]["memory"] == "m.safetensors" and calls[0][1]["rerank"] == RerankConfig(candidates=8)
    calls.clear()
    assert door.main(["--concepts", "off"]) == 0 and calls[0][1]["decoding"].concept_threshold is None
    assert main(["demo", "--concept-threshold", "0.6", "--max-constraints", "1"]) == 0
    assert calls[1][1]["decoding"] == DecodeConfig(concept_threshold=0.6, max_constraints=1)


def test_the_answer_shows_the_recognised_concepts_unless_off(captioner):
    cat = EXAMPLES_DIR / "cat.jpg"
    markdown, rows = predict(captioner, str(cat), strategy="beam", n_best=2)
    concepts = next(line for line in markdown.splitlines() if line.startswith("Recognised:"))
    assert "**cat** 0." in concepts and "made to name them" in concepts  # word, probability, what was done
    assert all("cat" in row[1].split() for row in rows)
    greedy, _ = predict(captioner, str(cat), strategy="greedy", n_best=1)
    assert "**cat** 0." in greedy and "only beam search" in greedy
    from captioner.config import DecodeConfig

    off_markdown, off_rows = predict(captioner, str(cat), strategy="beam", n_best=2,
                                     decoding=DecodeConfig(concept_threshold=None))
    assert "Recognised" not in off_markdown and off_rows != rows
    # the demo's batched handler gives every visitor the server's concept setting
    off = BatchedPredictor(captioner, decoding=DecodeConfig(concept_threshold=None))
    assert off(str(cat), "beam", 3, 1.0, 0, 2) == (off_markdown, off_rows)
    assert BatchedPredictor(captioner)(str(cat), "beam", 3, 1.0, 0, 2) == (markdown, rows)
    # a photo with no confident concept says so
    none_markdown, _ = predict(captioner, str(cat), strategy="beam", decoding=DecodeConfig(concept_threshold=1.0))
    assert "Recognised: nothing" in none_markdown.replace("\\", "")


# ------------------------------------------------------------------------------------ in a browser
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status(url: str) -> int:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never via a proxy
    try:
        with opener.open(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _save_small_png(png: bytes, path: Path, max_bytes: int = 200_000) -> None:
    """Write a screenshot, reduced to a 256-colour palette when needed to stay under max_bytes."""
    import io

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if len(png) > max_bytes:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(buffer, "PNG", optimize=True)
        png = buffer.getvalue()
    path.write_bytes(png)


def test_demo_in_a_real_browser(page_captioner, example, tmp_path, monkeypatch):
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} not found (apt-get install chromium)"
        if os.environ.get("CAPTIONER_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + "; the browser test is required when CAPTIONER_REQUIRE_SHARED_DATA=1")
        pytest.skip(message + "; browser test skipped")
    from playwright.sync_api import expect, sync_playwright

    for variable in ("NO_PROXY", "no_proxy"):  # gradio checks its own startup over HTTP; keep that local
        monkeypatch.setenv(variable, ",".join(filter(None, [os.environ.get(variable), "127.0.0.1", "localhost"])))

    app = build_app(page_captioner)
    port = _free_port()
    serve(app, host="127.0.0.1", port=port, prevent_thread_lock=True)
    outside_requests: list[str] = []

    def local_only(route):  # the demo must work with no internet: refuse and record anything else
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            outside_requests.append(route.request.url)
            route.abort()

    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.route("**/*", local_only)
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                page.locator("#photo input[type=file]").set_input_files(str(example))
                page.locator("#preview img").wait_for(timeout=20_000)  # uploaded and shown
                page.locator("#caption-button").click()
                heading = page.locator("#best-caption h2")
                heading.wait_for(timeout=20_000)
                caption = heading.inner_text().strip()
                assert caption, "the page shows an empty caption"
                expect(page.locator("#nbest")).to_contain_text(caption.lower(), timeout=5_000)
                expect(page.locator("#best-caption")).to_contain_text("Recognised", timeout=5_000)  # concepts
                png = page.screenshot(full_page=True)

                # A fresh page: sampling shows its own controls; a text file gets a message, not a trace.
                not_a_photo = tmp_path / "notes.jpg"
                not_a_photo.write_text("shopping list: bread, milk\n")
                page.reload(wait_until="domcontentloaded")
                page.get_by_text("Sampling", exact=True).click()
                page.get_by_text("Temperature", exact=True).wait_for(timeout=5_000)
                page.locator("#photo input[type=file]").set_input_files(str(not_a_photo))
                page.locator("#best-caption h3").get_by_text("could not be used").wait_for(timeout=10_000)
                page.locator("#caption-button").click()
                page.locator("#best-caption").get_by_text("not an image").wait_for(timeout=10_000)
            finally:
                browser.close()
        # Gradio serves the example photos and uploads, nothing else from this machine.
        assert _status(f"http://127.0.0.1:{port}/gradio_api/file={example.resolve()}") == 200
        for private in (REPO_ROOT / "pyproject.toml", EXAMPLES_DIR / "SOURCES.md", Path("/etc/passwd")):
            assert _status(f"http://127.0.0.1:{port}/gradio_api/file={private.resolve()}") == 403, private
    finally:
        app.close()
    _save_small_png(png, tmp_path / "demo.png")
    if not README_SCREENSHOT.exists() or os.environ.get("CAPTIONER_UPDATE_SCREENSHOT") == "1":
        _save_small_png(png, README_SCREENSHOT)
    assert not outside_requests, f"the page tried to reach the internet: {outside_requests}"
