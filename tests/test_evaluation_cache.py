"""Evaluating from a feature cache: images the cache could not encode are reported with the cache's reason."""

import json

import pytest
from PIL import Image

from captioner.data import CaptionRecord, load_dataset
from captioner.encoders import get_encoder
from captioner.features import FeatureCache, cached_record_features, extract_features


@pytest.fixture(scope="module")
def lite0():
    return get_encoder("efficientnet_lite0")


@pytest.mark.slow
def test_missing_cached_features_say_why(tmp_path, lite0, one_torch_thread) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(images / "red.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    entries = [{"filename": name, "split": "test", "sentences": [{"raw": "a thing ."}]}
               for name in ("red.png", "broken.jpg")]
    (tmp_path / "dataset_tiny.json").write_text(json.dumps({"images": entries}))
    dataset = load_dataset(tmp_path / "dataset_tiny.json", images_dir=images)
    records = dataset.split("test")
    with pytest.warns(UserWarning, match="could not be loaded"):
        extract_features(records, lite0, tmp_path / "cache", progress=False)

    kept, features, problems = cached_record_features(records, FeatureCache.open(tmp_path / "cache"), "efficientnet_lite0",
                                                      lite0.weights_hash)
    assert [r.image_id for r in kept] == ["red.png"] and features.shape == (1, 1280)
    assert len(problems) == 1 and "broken.jpg: no cached feature (" in problems[0]

    Image.new("RGB", (64, 48)).save(images / "new.png")  # an image the cache has never seen
    extra = CaptionRecord("new.png", str(images / "new.png"), ["a thing ."], "test")
    _, _, problems = cached_record_features([extra], FeatureCache.open(tmp_path / "cache"), "efficientnet_lite0")
    assert problems == [f"{images / 'new.png'}: not in the feature cache {tmp_path / 'cache'}"]
