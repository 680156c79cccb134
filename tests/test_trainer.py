"""The one training loop with a scripted objective: epoch 0, best/last selection, early stopping, the log,
resume and its refusals, and the doors an objective may keep closed (torchrun, --amp)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from captioner.checkpoint import CheckpointError, load_checkpoint, read_raw, save_checkpoint
from captioner.config import DecodeConfig, ModelConfig, TrainConfig, to_dict
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary
from captioner.train import BEST, CURVES, LAST, LOG, Objective, Trainer, epoch_order

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Scripted(Objective):
    """A tiny decoder pulled towards zero; its val CIDEr-D per epoch comes from `scores` (epoch 0 first)."""

    name = "scripted"
    validates_start = True
    curve = ("train_loss", "scripted", "loss")

    def __init__(self, scores: list[float], config: TrainConfig) -> None:
        self.scores, self.config, self.validated = scores, config, 0

    def prepare(self, device: torch.device, amp: str | None, initial: object) -> None:
        self.vocab = Vocabulary.build([["a", "dog"]], min_count=1)
        self.model = CaptionDecoder(ModelConfig(vocab_size=len(self.vocab), feature_dim=4, embed_dim=4,
                                                hidden_dim=4, image_dim=4))

    @property
    def examples(self) -> int:
        return 6

    @property
    def steps_per_epoch(self) -> int:
        return 3

    def settings(self) -> dict[str, Any]:
        return {"train_config": self.config}

    def run_info(self) -> dict[str, Any]:
        return {"train_config": to_dict(self.config), "seed": self.config.seed}

    def start_epoch(self) -> None:
        self.model.train()
        self.losses: list[float] = []

    def batches(self, order: torch.Tensor) -> Iterator[torch.Tensor]:
        yield from order.split(2)

    def loss(self, batch: torch.Tensor, module: torch.nn.Module, autocast: Any) -> torch.Tensor:
        loss = sum((p ** 2).sum() for p in module.parameters()) * float(batch.sum() + 1)
        self.losses.append(loss.item())
        return loss

    def epoch_stats(self, train_seconds: float) -> dict[str, Any]:
        return {"train_loss": sum(self.losses) / len(self.losses)}

    def validate(self, model: CaptionDecoder) -> dict[str, float]:
        score = self.scores[self.validated]
        self.validated += 1
        return {"BLEU-4": score / 2, "CIDEr-D": score}


def _config(**overrides: Any) -> TrainConfig:
    return TrainConfig(**{"epochs": 6, "lr": 1e-2, "patience": 2, "seed": 4,
                          "val_decode": DecodeConfig(strategy="greedy"), **overrides})


def _log(run) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / LOG).read_text().splitlines()]


@pytest.mark.slow
def test_start_competes_best_is_kept_and_patience_stops_the_run(tmp_path, capsys):
    #        epoch 0    1    2    3    4    (5, 6 never run: two epochs without gain after epoch 2)
    scores = [0.5, 0.4, 0.6, 0.55, 0.58, 0.9, 0.9]
    best = Trainer(Scripted(scores, _config()), tmp_path, progress=False).run()
    assert best == tmp_path / BEST and (tmp_path / CURVES).is_file()
    log = _log(tmp_path)
    assert [e["epoch"] for e in log] == [0, 1, 2, 3, 4]
    assert [e["best"] for e in log] == [True, False, True, False, False]
    assert log[0].get("train_loss") is None and log[1]["train_loss"] > 0 and "lr" in log[1]
    assert load_checkpoint(best).info["epoch"] == 2
    _, metadata = read_raw(tmp_path / LAST)
    state = json.loads(metadata["training_state"])
    assert (state["epoch"], state["best_cider"], state["bad_epochs"]) == (4, 0.6, 2)
    assert "stopping: val CIDEr-D has not improved for 2 epochs" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_that_never_beats_its_start_still_has_a_best_checkpoint(tmp_path):
    best = Trainer(Scripted([0.5, 0.1, 0.2], _config(epochs=2)), tmp_path, progress=False).run()
    assert load_checkpoint(best).info["epoch"] == 0


@pytest.mark.slow
def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    scores = [0.5, 0.6, 0.7, 0.8]
    Trainer(Scripted(scores, _config(epochs=3)), tmp_path / "straight", progress=False).run()

    def stop(entry: dict[str, Any]) -> None:
        if entry["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(Scripted(scores, _config(epochs=3)), tmp_path / "resumed", progress=False, on_epoch_end=stop).run()
    # no epoch 0 again on resume: the scores continue from epoch 2
    Trainer(Scripted(scores[2:], _config(epochs=3)), tmp_path / "resumed", resume=True, progress=False).run()
    straight, _ = read_raw(tmp_path / "straight" / LAST)
    resumed, _ = read_raw(tmp_path / "resumed" / LAST)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert [e["epoch"] for e in _log(tmp_path / "resumed")] == [0, 1, 2, 3]


@pytest.mark.slow
def test_resume_refuses_other_settings_another_kind_of_run_and_plain_checkpoints(tmp_path):
    Trainer(Scripted([0.5, 0.6], _config(epochs=1)), tmp_path, progress=False).run()
    with pytest.raises(CheckpointError, match=r"other settings \(lr 0.01 in the run, 0.5 now; val_decode.beam_size 3 "
                                              r"in the run, 4 now\); resume it with the run's settings"):
        Trainer(Scripted([0.5, 0.6], _config(epochs=1, lr=0.5, val_decode=DecodeConfig(strategy="greedy", beam_size=4))),
                tmp_path, resume=True, progress=False).run()

    class OtherKind(Scripted):
        def settings(self) -> dict[str, Any]:
            return {"scst_config": self.config}

    with pytest.raises(CheckpointError, match="another kind of run"):
        Trainer(OtherKind([0.5], _config(epochs=1)), tmp_path, resume=True, progress=False).run()
    # a plain checkpoint where the training state should be (e.g. best copied over last)
    plain = load_checkpoint(tmp_path / BEST)
    save_checkpoint(tmp_path / LAST, plain.model, plain.vocab, plain.encoder, plain.info)
    with pytest.raises(CheckpointError, match="not a training-state checkpoint"):
        Trainer(Scripted([0.5], _config(epochs=1)), tmp_path, resume=True, progress=False).run()


@pytest.mark.slow
def test_a_run_is_replaced_only_when_asked(tmp_path):
    Trainer(Scripted([0.5, 0.6], _config(epochs=1)), tmp_path, progress=False).run()
    with pytest.raises(ValueError, match="holds a training run .*; continue it with --resume, replace it with "
                                         "--overwrite"):
        Trainer(Scripted([0.5, 0.6], _config(epochs=1)), tmp_path, progress=False).run()
    Trainer(Scripted([0.1, 0.2, 0.3], _config(epochs=2)), tmp_path, overwrite=True, progress=False).run()
    assert [e["epoch"] for e in _log(tmp_path)] == [0, 1, 2]


@pytest.mark.slow
def test_a_constant_rate_run_resumed_with_more_epochs_ends_as_the_longer_run(tmp_path):
    """SCST's learning rate is constant, so its epochs may grow on resume (the scripted objective's too):
    2 epochs, then --resume with 4, gives the weights of an uninterrupted 4-epoch run. Fewer epochs than
    the run has trained are refused."""
    from captioner.train import CnnFinetuning, SelfCritical, TeacherForcing

    assert SelfCritical.epochs_fixed is None and Scripted.epochs_fixed is None
    assert TeacherForcing.epochs_fixed and CnnFinetuning.epochs_fixed  # their rates decay over the run's epochs
    scores = [0.5, 0.6, 0.7, 0.8, 0.9]
    Trainer(Scripted(scores, _config(epochs=4)), tmp_path / "straight", progress=False).run()
    Trainer(Scripted(scores, _config(epochs=2)), tmp_path / "grown", progress=False).run()
    with pytest.raises(CheckpointError, match="the run has trained 2 epochs already, more than --epochs 1"):
        Trainer(Scripted(scores[3:], _config(epochs=1)), tmp_path / "grown", resume=True, progress=False).run()
    Trainer(Scripted(scores[3:], _config(epochs=4)), tmp_path / "grown", resume=True, progress=False).run()
    straight, _ = read_raw(tmp_path / "straight" / LAST)
    grown, metadata = read_raw(tmp_path / "grown" / LAST)
    for key in straight:
        assert torch.equal(straight[key], grown[key]), key
    assert [e["epoch"] for e in _log(tmp_path / "grown")] == [0, 1, 2, 3, 4]
    assert json.loads(metadata["info"])["train_config"]["epochs"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("best_is_last", [True, False])
def test_resume_checks_the_best_checkpoint(tmp_path, best_is_last, capsys):
    """A finished run whose best.safetensors was truncated: rewritten from last.safetensors when that holds the
    best epoch, else refused (the best weights are lost), never reported as the best checkpoint."""
    scores = [0.5, 0.6, 0.7] if best_is_last else [0.5, 0.7, 0.6]
    Trainer(Scripted(scores, _config(epochs=2)), tmp_path, progress=False).run()
    good = (tmp_path / BEST).read_bytes()
    (tmp_path / BEST).write_bytes(good[:len(good) // 2])
    resumed = Trainer(Scripted([], _config(epochs=2)), tmp_path, resume=True, progress=False)
    if best_is_last:
        assert resumed.run() == tmp_path / BEST
        assert "unreadable (not a readable safetensors checkpoint" in capsys.readouterr().out
        assert load_checkpoint(tmp_path / BEST).info["epoch"] == 2
        last, _ = read_raw(tmp_path / LAST)
        best, _ = read_raw(tmp_path / BEST)
        assert all(torch.equal(last[k], best[k]) for k in best if k.startswith("model."))
    else:
        with pytest.raises(CheckpointError, match=r"best.safetensors: unreadable .*the weights of the run's best "
                                                  r"epoch \(1, val CIDEr-D 70.0\) are lost \(last.safetensors holds "
                                                  r"epoch 2\): start the run again with --overwrite"):
            resumed.run()
        (tmp_path / BEST).unlink()
        with pytest.raises(CheckpointError, match="best.safetensors: missing; the weights of the run's best"):
            Trainer(Scripted([], _config(epochs=2)), tmp_path, resume=True, progress=False).run()


@pytest.mark.slow
def test_a_setting_added_since_the_run_was_saved_counts_as_its_default(tmp_path):
    Trainer(Scripted([0.5, 0.6, 0.7], _config(epochs=2)), tmp_path, progress=False).run()
    tensors, metadata = read_raw(tmp_path / LAST)
    info = json.loads(metadata["info"])
    del info["train_config"]["ema_decay"]  # as a run saved before the field existed
    metadata["info"] = json.dumps(info)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / LAST), metadata=metadata)
    Trainer(Scripted([], _config(epochs=2)), tmp_path, resume=True, progress=False).run()  # nothing left to do


def test_closed_doors_are_refused_clearly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="scripted runs in one process; start it without torchrun"):
        Trainer(Scripted([], _config()), "unused")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="--amp: scripted runs in float32"):
        Trainer(Scripted([], _config()), "unused", amp="bf16")


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert torch.equal(epoch_order(50, 3, 2), epoch_order(50, 3, 2))
    assert not torch.equal(epoch_order(50, 3, 2), epoch_order(50, 3, 3))
    assert sorted(epoch_order(50, 3, 2).tolist()) == list(range(50))


def test_settings_from_options_take_the_library_defaults_for_what_is_not_given():
    from captioner.config import FinetuneConfig, ScstConfig

    assert ScstConfig.from_options(epochs=None, lr=None, patience=2) == ScstConfig(patience=2)
    assert TrainConfig.from_options(epochs=3, lr=None).lr == TrainConfig().lr
    assert FinetuneConfig.from_options(patience=None).patience == FinetuneConfig().patience
