"""Training: it learns, it logs, and an interrupted run resumed ends with the same weights."""

import json

import pytest
import torch

from captioner.checkpoint import load_checkpoint, read_raw
from captioner.config import DecodeConfig, TrainConfig
from captioner.data.records import CaptionRecord
from captioner.training import BEST, CURVES, LAST, LOG, learning_rate, train

WORDS = ["dog", "cat", "man", "woman", "runs", "sits", "on", "the", "grass", "beach", "red", "blue"]


def _records(count, split, seed):
    generator = torch.Generator().manual_seed(seed)
    records = []
    for i in range(count):
        picks = torch.randint(0, len(WORDS), (3, 4), generator=generator).tolist()
        captions = [f"a {' '.join(WORDS[j] for j in row)} ." for row in picks]
        records.append(CaptionRecord(f"{split}{i}.jpg", f"/nowhere/{split}{i}.jpg", captions, split))
    return records, torch.randn(count, 16, generator=generator)


def _config(epochs=3):
    return TrainConfig(epochs=epochs, batch_size=8, lr=5e-3, warmup_steps=2, min_word_count=1, patience=10,
                       seed=7, val_decode=DecodeConfig(strategy="beam", beam_size=2, max_length=8))


MODEL = {"embed_dim": 16, "hidden_dim": 24, "image_dim": 16, "dropout": 0.2}


def _run(out_dir, epochs=3, resume=False, stop_after=None):
    train_records, train_features = _records(24, "train", 0)
    val_records, val_features = _records(6, "val", 1)

    def stop(entry):
        if stop_after is not None and entry["epoch"] == stop_after:
            raise KeyboardInterrupt

    return train(train_records, train_features, val_records, val_features, out_dir, MODEL, _config(epochs),
                 encoder={"encoder": "test"}, resume=resume, progress=False, on_epoch_end=stop)


def test_run_writes_checkpoints_log_and_curves(tmp_path):
    best = _run(tmp_path)
    assert best == tmp_path / BEST
    for name in (BEST, LAST, LOG, CURVES):
        assert (tmp_path / name).is_file()
    log = [json.loads(line) for line in (tmp_path / LOG).read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3]
    assert {"train_loss", "lr", "val", "train_seconds", "captions_per_second", "data_wait_share"} <= log[0].keys()
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    checkpoint = load_checkpoint(best)
    assert checkpoint.info["seed"] == 7 and "val_metrics" in checkpoint.info
    assert checkpoint.encoder == {"encoder": "test"}


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    _run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "interrupted", stop_after=1)
    _run(tmp_path / "interrupted", resume=True)
    straight, _ = read_raw(tmp_path / "straight" / LAST)
    resumed, _ = read_raw(tmp_path / "interrupted" / LAST)
    for key, value in straight.items():
        if key.startswith("model."):
            assert torch.equal(value, resumed[key]), key
    log = (tmp_path / "interrupted" / LOG).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2, 3]


def test_resume_with_other_settings_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, stop_after=1)
    with pytest.raises(ValueError, match="other settings"):
        _run(tmp_path, epochs=5, resume=True)


def test_learning_rate_schedule():
    config = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert learning_rate(0, 100, config) == pytest.approx(1e-4)
    assert learning_rate(9, 100, config) == pytest.approx(1e-3)
    assert learning_rate(100, 100, config) == pytest.approx(1e-5)
    assert learning_rate(55, 100, config) < learning_rate(20, 100, config)
