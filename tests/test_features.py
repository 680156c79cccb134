"""Feature cache: equals the encoder, resumes exactly after an interruption, refuses mixing, skips bad files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data.records import CaptionRecord
from captioner.encoders import Encoder, get_encoder
from captioner.features import (
    FeatureCache,
    FeatureCacheError,
    encode_images,
    extract_features,
    image_loader,
)
from captioner.features import cache as cache_module
from captioner.features import loader as loader_module

FP16_TOLERANCE = dict(rtol=2e-3, atol=2e-3)
pytestmark = pytest.mark.slow  # every test runs the CNN over photos


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return get_encoder("efficientnet_lite0")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """Twelve small generated photos: smooth colour fields with noise, of a few sizes and formats."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for index in range(12):
        height, width = [(224, 224), (256, 341), (300, 200)][index % 3]
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, index * 20)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo_{index:02d}.{'png' if index == 5 else 'jpg'}")
    return folder


def records_for(folder: Path) -> list[CaptionRecord]:
    return [CaptionRecord(image_id=path.name, image_path=path, captions=["a caption"], split="train")
            for path in sorted(folder.iterdir())]


def test_cache_equals_direct_encoder_outputs(tmp_path: Path, encoder: Encoder, photo_dir: Path) -> None:
    records = records_for(photo_dir)
    cache = extract_features(records + records[:3], encoder, tmp_path / "cache", batch_size=5, progress=False)
    assert len(cache) == 12 and cache.ids == [r.image_id for r in records]
    assert records[0].image_id in cache and "other.jpg" not in cache
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == ["features.f16.npy", "index.json", "meta.json"]
    assert np.load(tmp_path / "cache" / "features.f16.npy").dtype == np.float16

    direct = encode_images([Image.open(r.image_path) for r in records], encoder).features  # (12, 1280)
    cached = cache.get_batch([r.image_id for r in records])
    assert cached.dtype == torch.float32 and cached.shape == (12, 1280)
    assert torch.allclose(cached, direct, **FP16_TOLERANCE)
    unbatched = encoder(encoder.preprocess(Image.open(records[4].image_path).convert("RGB"))[None])[0]
    assert np.allclose(cache[records[4].image_id], unbatched.numpy(), **FP16_TOLERANCE)

    reopened = FeatureCache.open(tmp_path / "cache")
    meta = reopened.meta
    assert (meta["encoder"], meta["feature_dim"], meta["count"], meta["format_version"]) == (
        "efficientnet_lite0", 1280, 12, 1)
    assert meta["weights_hash"] == encoder.weights_hash and meta["preprocessing"]["input_size"] == 224
    assert meta["failed"] == []
    with pytest.raises(KeyError, match="not in the feature cache"):
        reopened["other.jpg"]


def test_interrupted_run_resumes_to_the_same_features(tmp_path: Path, encoder: Encoder, photo_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    records = records_for(photo_dir)
    whole = extract_features(records, encoder, tmp_path / "whole", batch_size=4, progress=False)

    original_append = cache_module.PartialCache.append
    calls = []

    def append_then_crash(self, ids, rows, failed):
        if len(calls) == 1:  # the second batch never reaches the disk
            raise KeyboardInterrupt
        calls.append(ids)
        original_append(self, ids, rows, failed)

    monkeypatch.setattr(cache_module.PartialCache, "append", append_then_crash)
    with pytest.raises(KeyboardInterrupt):
        extract_features(records, encoder, tmp_path / "resumed", batch_size=4, progress=False)
    monkeypatch.setattr(cache_module.PartialCache, "append", original_append)
    with pytest.raises(FeatureCacheError, match="interrupted"):
        FeatureCache.open(tmp_path / "resumed")

    # A torn write on top: half a row and half a log line after the last complete batch.
    partial = tmp_path / "resumed" / "partial"
    with open(partial / "features.f16.bin", "ab") as rows_file:
        rows_file.write(b"\x00" * 1000)
    with open(partial / "batches.jsonl", "a") as log:
        log.write('{"ids": ["photo_')

    loaded = []
    monkeypatch.setattr(loader_module, "load_image",
                        lambda path, **kwargs: loaded.append(Path(path).name) or Image.open(path).convert("RGB"))
    resumed = extract_features(records, encoder, tmp_path / "resumed", batch_size=4, progress=False)
    assert sorted(loaded) == [r.image_id for r in records[4:]]  # only what was not on disk
    assert resumed.ids == whole.ids
    assert np.array_equal(np.asarray(resumed.features), np.asarray(whole.features))
    assert not partial.exists()


def test_finished_cache_is_reused_and_extended(tmp_path: Path, encoder: Encoder, photo_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    records = records_for(photo_dir)
    first = extract_features(records[:6], encoder, tmp_path / "cache", batch_size=8, progress=False)
    before = np.array(first.features)
    loaded = []
    monkeypatch.setattr(loader_module, "load_image",
                        lambda path, **kwargs: loaded.append(Path(path).name) or Image.open(path).convert("RGB"))
    extract_features(records[:6], encoder, tmp_path / "cache", batch_size=8, progress=False)
    assert loaded == []  # nothing to do
    extended = extract_features(records, encoder, tmp_path / "cache", batch_size=8, progress=False)
    assert sorted(loaded) == [r.image_id for r in records[6:]]
    assert len(extended) == 12 and np.array_equal(np.asarray(extended.features[:6]), before)


def test_other_encoder_or_weights_are_refused(tmp_path: Path, encoder: Encoder, photo_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    records = records_for(photo_dir)[:4]
    extract_features(records, encoder, tmp_path / "cache", batch_size=4, progress=False)
    other_weights = Encoder(encoder.spec, encoder.model, "0123456789abcdef", "elsewhere")
    with pytest.raises(FeatureCacheError, match="weights_hash") as caught:
        extract_features(records, other_weights, tmp_path / "cache", progress=False)
    assert "captioner features --overwrite" in str(caught.value) and str(tmp_path / "cache") in str(caught.value)
    with pytest.raises(FeatureCacheError, match="weights_hash"):
        FeatureCache.open(tmp_path / "cache").check_encoder(other_weights)
    FeatureCache.open(tmp_path / "cache").check_encoder(encoder)

    resnet_like = Encoder(dataclasses.replace(encoder.spec, name="resnet50"), encoder.model,
                          encoder.weights_hash, "")
    with pytest.raises(FeatureCacheError, match="encoder"):
        extract_features(records, resnet_like, tmp_path / "cache", progress=False)

    # A partial (interrupted) cache is guarded the same way.
    monkeypatch.setattr(cache_module.PartialCache, "append",
                        lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        extract_features(records, encoder, tmp_path / "partial", batch_size=2, progress=False)
    with pytest.raises(FeatureCacheError, match="weights_hash"):
        extract_features(records, other_weights, tmp_path / "partial", progress=False)


def test_bad_images_are_reported_and_skipped(tmp_path: Path, encoder: Encoder, photo_dir: Path) -> None:
    records = records_for(photo_dir)[:3]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((photo_dir / "photo_00.jpg").read_bytes()[:600])
    (tmp_path / "notes.jpg").write_text("not a photo")
    bad = [CaptionRecord("truncated.jpg", truncated, ["x"], "train"),
           CaptionRecord("notes.jpg", tmp_path / "notes.jpg", ["x"], "train"),
           CaptionRecord("gone.jpg", tmp_path / "gone.jpg", ["x"], "train")]
    with pytest.warns(UserWarning, match="3 image") as caught:
        cache = extract_features([records[0], *bad, *records[1:]], encoder, tmp_path / "cache", batch_size=2,
                                 num_workers=1, progress=False)  # also covers the worker-process path
    message = str(caught[0].message)
    assert str(truncated) in message and "truncated" in message and "not an image" in message
    assert len(cache) == 3 and "truncated.jpg" not in cache
    failed = {entry["image_id"]: entry for entry in cache.failed}
    assert set(failed) == {"truncated.jpg", "notes.jpg", "gone.jpg"}
    assert failed["gone.jpg"]["reason"] == "file not found" and failed["gone.jpg"]["path"] == str(tmp_path / "gone.jpg")
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["failed"] == cache.failed
    with pytest.raises(KeyError, match="failed to load"):
        cache["notes.jpg"]


def test_encode_images_and_image_loader(encoder: Encoder, photo_dir: Path, tmp_path: Path) -> None:
    paths = [photo_dir / "photo_00.jpg", tmp_path / "missing.jpg", photo_dir / "photo_01.jpg"]
    encoded = encode_images(paths, encoder, batch_size=2)
    assert encoded.features.shape == (2, 1280) and encoded.failures == [(1, "file not found")]
    assert encoded.indices == [0, 2]
    in_memory = encode_images([Image.open(paths[0]), paths[2].read_bytes()], encoder, batch_size=1).features
    assert torch.equal(encoded.features, in_memory)  # one route, whatever the input kind
    loader = image_loader(paths, encoder, batch_size=2)
    batches = list(loader)
    assert len(loader) == 2 and [b.indices for b in batches] == [[0], [2]]
    assert batches[0].failures == [(1, "file not found")] and batches[0].images.shape == (1, 3, 224, 224)


@pytest.mark.shared_data
def test_flickr8k_photos(flickr8k_dir: Path, encoder: Encoder, tmp_path: Path) -> None:
    names = sorted(p.name for p in (flickr8k_dir / "images").iterdir())[:12]
    records = [CaptionRecord(name, flickr8k_dir / "images" / name, ["x"], "train") for name in names]
    cache = extract_features(records, encoder, tmp_path / "cache", batch_size=6, progress=False)
    direct = encode_images([r.image_path for r in records], encoder).features
    assert torch.allclose(cache.get_batch(names), direct, **FP16_TOLERANCE)
