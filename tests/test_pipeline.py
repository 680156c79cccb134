"""The one image -> caption pipeline: groups in input order with per-file errors, one decoder call per
setting, and (with the real CNN) every image read and decoded once whichever door runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.config import DecodeConfig
from captioner.features.encode import EncodedBatch
from captioner.pipeline import decode_group, gathered, setting_groups

EXAMPLES = Path(__file__).resolve().parents[1] / "demo" / "examples"


def batch(indices, failures=()):
    """An EncodedBatch whose feature rows hold their input positions."""
    return EncodedBatch(list(indices), torch.tensor([[float(i)] for i in indices]).view(-1, 1), list(failures))


def test_batches_are_gathered_until_enough_images_loaded():
    batches = [batch([0, 1]), batch([], [(2, "bad"), (3, "bad")]), batch([4, 5]), batch([6])]
    groups = list(gathered(batches, decode_batch_size=3))
    assert [[b.indices for b in group] for group in groups] == [[[0, 1], [], [4, 5]], [[6]]]
    assert [len(group) for group in gathered(batches, decode_batch_size=1)] == [1, 2, 1]  # failures ride along


def test_a_group_comes_back_in_input_order_with_its_errors():
    calls = []

    def decode(features, config):
        calls.append((features.view(-1).tolist(), config.strategy))
        return [[f"caption of {int(row)}"] for row in features.view(-1).tolist()]

    group = [batch([0, 2], [(1, "not an image")]), batch([4], [(3, "empty file (0 bytes)")])]
    results = decode_group(group, decode, DecodeConfig())
    assert [(r.index, r.captions, r.error) for r in results] == [
        (0, ["caption of 0"], None), (1, None, "not an image"), (2, ["caption of 2"], None),
        (3, None, "empty file (0 bytes)"), (4, ["caption of 4"], None)]
    assert calls == [([0.0, 2.0, 4.0], "beam")]  # one config: one call for the whole group


def test_per_input_settings_decode_equal_ones_together_and_samples_alone():
    beam, greedy, sample = DecodeConfig(), DecodeConfig(strategy="greedy"), DecodeConfig(strategy="sample", seed=1)
    configs = [beam, greedy, sample, beam, sample, greedy]
    groups = setting_groups([0, 1, 2, 3, 4, 5], configs)
    assert [(rows, config.strategy) for rows, config in groups] == [
        ([0, 3], "beam"), ([1, 5], "greedy"), ([2], "sample"), ([4], "sample")]
    # rows are positions among the loaded images; the settings are looked up by input index
    assert setting_groups([1, 3], configs) == [([0], greedy), ([1], beam)]


@pytest.mark.slow
def test_every_door_reads_and_decodes_each_image_once(toy_checkpoint, tmp_path, monkeypatch, one_torch_thread):
    from captioner.api import Captioner
    from captioner.features import loader as loader_module
    from captioner.images import load as load_module

    captioner = Captioner.from_pretrained(toy_checkpoint, device="cpu")
    photo = EXAMPLES / "cat.jpg"
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("not a photo")
    inputs = [str(photo), photo.read_bytes(), str(not_a_photo), Image.open(photo).convert("RGB")]
    opened, decoded = [], []
    real_load, real_decode = loader_module.load_image, load_module._decode
    monkeypatch.setattr(loader_module, "load_image", lambda source, **kw: opened.append(type(source).__name__)
                        or real_load(source, **kw))
    monkeypatch.setattr(load_module, "_decode", lambda *args, **kw: decoded.append(args[1]) or real_decode(*args, **kw))
    results = captioner.caption(inputs, strategy="greedy")
    assert sorted(opened) == sorted(["str", "bytes", "str", "Image"])  # each input loaded once
    assert len(decoded) == 3  # the two encoded ones and the text file; the PIL image is already decoded
    assert [r.error is None for r in results] == [True, True, False, True]
    assert results[2].error.startswith(f"{not_a_photo}: not an image")
    assert results[0].caption == results[1].caption == results[3].caption
