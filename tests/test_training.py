"""Training: it learns, it logs, and an interrupted run resumed ends with the same weights."""

import json

import pytest
import torch
from helpers import random_caption_records

from captioner.checkpoint import load_checkpoint, read_raw
from captioner.config import DecodeConfig, ModelConfig, TrainConfig
from captioner.model import CaptionDecoder
from captioner.train import BEST, CURVES, LAST, LOG, WeightAverage, learning_rate, train


def _config(epochs=3, ema_decay=0.0):
    return TrainConfig(epochs=epochs, batch_size=8, lr=5e-3, warmup_steps=2, min_word_count=1, patience=10,
                       seed=7, val_decode=DecodeConfig(strategy="beam", beam_size=2, max_length=8),
                       ema_decay=ema_decay)


MODEL = ModelConfig(embed_dim=16, hidden_dim=24, image_dim=16, dropout=0.2)


def _run(out_dir, epochs=3, resume=False, stop_after=None, ema_decay=0.0):
    train_records, train_features = random_caption_records(24, "train", 0)
    val_records, val_features = random_caption_records(6, "val", 1)

    def stop(entry):
        if stop_after is not None and entry["epoch"] == stop_after:
            raise KeyboardInterrupt

    return train(train_records, train_features, val_records, val_features, out_dir, MODEL, _config(epochs, ema_decay),
                 encoder={"encoder": "test"}, resume=resume, progress=False, on_epoch_end=stop)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_run_saved_with_the_old_validation_settings_resumes(tmp_path):
    """Runs saved before validation recorded the truth say concept_threshold 0.3 in their val_decode (it
    never ran: validation has no concepts); they read back as None and resume."""
    from safetensors.torch import save_file

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, stop_after=1)
    tensors, metadata = read_raw(tmp_path / LAST)
    info = json.loads(metadata["info"])
    assert info["val_decode"]["concept_threshold"] is None is info["train_config"]["val_decode"]["concept_threshold"]
    info["val_decode"]["concept_threshold"] = info["train_config"]["val_decode"]["concept_threshold"] = 0.3
    save_file(tensors, str(tmp_path / LAST), metadata={**metadata, "info": json.dumps(info)})
    _run(tmp_path, resume=True)
    assert [json.loads(line)["epoch"] for line in (tmp_path / LOG).read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, stop_after=1)
    with pytest.raises(ValueError, match="the run was started for 3 epochs, not 5, and its epochs cannot change on "
                                         "resume: its learning rate follows one warm-up and cosine decay"):
        _run(tmp_path, epochs=5, resume=True)


def test_weight_average_follows_the_formula():
    model = CaptionDecoder(ModelConfig(vocab_size=9, feature_dim=4, embed_dim=4, hidden_dim=5, image_dim=4))
    average = WeightAverage(model, decay=0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for update in range(1, 30):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        average.update(model)
        decay = min(0.9, (1 + update) / (10 + update))
        expected = {k: decay * expected[k] + (1 - decay) * v for k, v in model.state_dict().items()}
    for key, value in average.model.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-5), key
        assert not torch.allclose(value, model.state_dict()[key])
    with pytest.raises(ValueError, match="between 0 and 1"):
        WeightAverage(model, decay=1.0)


@pytest.mark.slow
def test_weight_average_is_validated_saved_and_resumed(tmp_path):
    _run(tmp_path / "straight", ema_decay=0.9)
    log = [json.loads(line) for line in (tmp_path / "straight" / LOG).read_text().splitlines()]
    assert all({"val", "val_raw"} <= entry.keys() for entry in log)
    last, _ = read_raw(tmp_path / "straight" / LAST)  # the raw weights, and the average beside them
    assert any(not torch.equal(last[k], last["ema." + k[6:]]) for k in last if k.startswith("model."))
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "interrupted", stop_after=1, ema_decay=0.9)
    # epoch 1 is always the best so far: best.safetensors must hold the average, not the raw weights
    best, _ = read_raw(tmp_path / "interrupted" / BEST)
    first, _ = read_raw(tmp_path / "interrupted" / LAST)
    for key in (k for k in best if k.startswith("model.")):
        assert torch.equal(best[key], first["ema." + key[6:]]), key
    # resumed: the same raw weights and the same average as the uninterrupted run
    _run(tmp_path / "interrupted", resume=True, ema_decay=0.9)
    resumed, _ = read_raw(tmp_path / "interrupted" / LAST)
    for key in (k for k in last if k.startswith(("model.", "ema."))):
        assert torch.equal(last[key], resumed[key]), key


def test_learning_rate_schedule():
    config = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert learning_rate(0, 100, config) == pytest.approx(1e-4)
    assert learning_rate(9, 100, config) == pytest.approx(1e-3)
    assert learning_rate(100, 100, config) == pytest.approx(1e-5)
    assert learning_rate(55, 100, config) < learning_rate(20, 100, config)
