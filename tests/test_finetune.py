"""captioner finetune: the CNN and the decoder train together on images; the result loads with its own
CNN everywhere, and an interrupted run resumed ends with the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from captioner.api import Captioner
from captioner.apps.cli import main
from captioner.checkpoint import read_raw
from captioner.config import DecodeConfig, FinetuneConfig
from captioner.data import load_dataset
from captioner.encoders import get_encoder
from captioner.features import encode_images
from captioner.images import load_image
from captioner.train import BEST, CURVES, LAST, LOG, CnnFinetuning, finetune

pytestmark = pytest.mark.slow  # every test trains the CNN on the tiny Flickr8k run

CONFIG = FinetuneConfig(epochs=2, batch_images=4, encoder_lr=1e-3, warmup_steps=1, train_max_images=8,
                        val_max_images=4, val_decode=DecodeConfig(strategy="beam", beam_size=2, max_length=8))


def _run(tiny_run, out, resume=False, stop_after=None):
    dataset = load_dataset(tiny_run["data"], images_dir=tiny_run["images"])

    def stop(entry):
        if entry["epoch"] == stop_after:
            raise KeyboardInterrupt

    return finetune(tiny_run["checkpoint"], dataset.split("train"), dataset.split("val"), out, CONFIG,
                    resume=resume, progress=False, on_epoch_end=stop)


def test_the_command_trains_the_cnn_and_the_result_loads_with_it(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    data = ["--data", str(tiny_run["data"]), "--images", str(tiny_run["images"]), "--out", str(out)]
    settings = ["--epochs", "1", "--train-images", "8", "--val-images", "4", "--batch-images", "4",
                "--encoder-lr", "1e-3", "--warmup-steps", "1"]
    assert main(["train", "--objective", "finetune", "--init-from", str(tiny_run["checkpoint"]), *data,
                 *settings]) == 0
    # the old spelling is the same run: it resumes this one (same settings), with a notice
    assert main(["finetune", str(tiny_run["checkpoint"]), *data, *settings, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "captioner finetune: `captioner finetune CKPT` is deprecated; use `captioner train --objective " \
           "finetune --init-from CKPT`" in err
    log = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1] and log[1]["train_loss"] > 0
    assert (out / BEST).is_file() and (out / CURVES).is_file()
    _, metadata = read_raw(out / LAST)
    encoder = json.loads(metadata["encoder"])
    packaged = get_encoder("efficientnet_lite0")
    assert encoder["fine_tuned_from"] == packaged.weights_hash != encoder["weights_hash"]
    captioner = Captioner.from_pretrained(out / LAST, device="cpu")  # the hash check passes
    assert captioner.encoder.weights_hash == encoder["weights_hash"]
    dataset = load_dataset(tiny_run["data"], images_dir=tiny_run["images"])
    image = load_image(dataset.split("train")[0].image_path)
    assert not torch.allclose(encode_images([image], captioner.encoder).features,
                              encode_images([image], packaged).features, atol=1e-3)
    assert captioner.caption(image)[0].caption


def test_interrupted_then_resumed_equals_uninterrupted(tiny_run, tmp_path):
    _run(tiny_run, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_run, tmp_path / "interrupted", stop_after=1)
    _run(tiny_run, tmp_path / "interrupted", resume=True)
    straight, _ = read_raw(tmp_path / "straight" / LAST)
    resumed, _ = read_raw(tmp_path / "interrupted" / LAST)
    weights = [k for k in straight if k.startswith(("model.", "encoder."))]
    assert any(k.startswith("encoder.") for k in weights)
    for key in weights:
        assert torch.equal(straight[key], resumed[key]), key
    log = (tmp_path / "interrupted" / LOG).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [0, 1, 2]


def test_resume_with_other_settings_is_refused(tiny_run, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_run, tmp_path, stop_after=1)
    dataset = load_dataset(tiny_run["data"], images_dir=tiny_run["images"])
    with pytest.raises(ValueError, match="other settings"):
        finetune(tiny_run["checkpoint"], dataset.split("train"), dataset.split("val"), tmp_path,
                 FinetuneConfig(epochs=3, train_max_images=8, val_max_images=4), resume=True, progress=False)


@pytest.mark.slow
def test_a_run_that_never_beats_its_start_stops_early_and_returns_the_start(tiny_run, tmp_path, monkeypatch):
    """Early stopping, curves and a best.safetensors that always exists: the starting model, as it was."""
    scores = iter([0.5, 0.4])  # epoch 0 (the start), then epoch 1 does worse; patience 1 stops there

    def scripted(self, model):
        score = next(scores)
        return {"BLEU-4": score / 2, "CIDEr-D": score}

    monkeypatch.setattr(CnnFinetuning, "validate", scripted)
    dataset = load_dataset(tiny_run["data"], images_dir=tiny_run["images"])
    config = FinetuneConfig(epochs=3, batch_images=4, train_max_images=4, warmup_steps=1, patience=1)
    best = finetune(tiny_run["checkpoint"], dataset.split("train"), dataset.split("val"), tmp_path, config,
                    progress=False)
    log = [json.loads(line) for line in (tmp_path / LOG).read_text().splitlines()]
    assert [(entry["epoch"], entry["best"]) for entry in log] == [(0, True), (1, False)]
    assert best == tmp_path / BEST and (tmp_path / CURVES).is_file()
    start, chosen = read_raw(tiny_run["checkpoint"]), read_raw(best)
    assert json.loads(chosen[1]["encoder"]) == json.loads(start[1]["encoder"])  # the start's CNN, unchanged
    assert not any(k.startswith("encoder.") for k in chosen[0])
    for key, value in start[0].items():
        assert torch.equal(chosen[0][key], value), key
    assert "fine_tuned_from" in json.loads(read_raw(tmp_path / LAST)[1]["encoder"])  # epoch 1 did change it
