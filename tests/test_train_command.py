"""`captioner train`: one command whose --objective says what a run optimises and --init-from where it
starts; flags become the settings dataclasses once, a flag the objective would not use is refused, and the
old spellings (--scst, `captioner finetune CKPT`, `features --from-checkpoint`) still work with a notice."""

from __future__ import annotations

import json

import pytest

from captioner.apps.cli import build_parser, main
from captioner.apps.training import decoder_shape, settings
from captioner.config import DecodeConfig, FinetuneConfig, ModelConfig, ScstConfig, TrainConfig
from captioner.train import LOG


def flags(*argv: str) -> dict:
    return vars(build_parser().parse_args(["train", "--data", "d", "--out", "o", *argv]))


def refusal(capsys, *argv: str) -> str:
    """The error `captioner train` stops with (exit 2) before reading any data."""
    assert main(["train", "--data", "/nonexistent", "--out", "/nonexistent/run", *argv]) == 2
    return capsys.readouterr().err


def test_unset_flags_are_the_settings_defaults():
    assert settings("xe", flags()) == TrainConfig()
    assert settings("scst", flags()) == ScstConfig()
    assert settings("finetune", flags()) == FinetuneConfig()
    assert decoder_shape(flags()) is None
    assert decoder_shape(flags("--layers", "2", "--hidden-dim", "64")) == ModelConfig(num_layers=2, hidden_dim=64)
    assert settings("scst", flags("--lr", "1e-4", "--scst-samples", "3", "--val-beam-size", "2")) == ScstConfig(
        lr=1e-4, samples_per_image=3, val_decode=DecodeConfig(strategy="beam", beam_size=2))
    assert settings("finetune", flags("--no-flip", "--encoder-lr", "0.01")) == FinetuneConfig(flip=False,
                                                                                             encoder_lr=0.01)


def test_validation_records_the_decoding_it_runs():
    """Validation decodes without concepts; the settings say so, and an old run's 0.3 reads back as None."""
    assert TrainConfig().val_decode.concept_threshold is None
    assert TrainConfig(val_decode=DecodeConfig()).val_decode == DecodeConfig(concept_threshold=None)
    assert ScstConfig().val_decode.concept_threshold is None and FinetuneConfig().val_decode.concept_threshold is None


@pytest.mark.parametrize("argv, message", [
    (["--objective", "scst", "--init-from", "ck", "--features", "f", "--amp", "bf16"], "SCST runs in float32"),
    (["--objective", "scst", "--init-from", "ck", "--features", "f", "--device", "cuda"], "SCST runs on the CPU"),
    (["--objective", "scst", "--init-from", "ck", "--features", "f", "--batch-size", "8"], "--scst-batch-images"),
    (["--objective", "scst", "--init-from", "ck", "--features", "f", "--hidden-dim", "64"],
     "keeps the shape of its --init-from checkpoint"),
    (["--objective", "scst", "--init-from", "ck", "--features", "f", "--text-corpus", "t"], "cross-entropy"),
    (["--objective", "scst", "--init-from", "ck", "--features", "f", "--ema-decay", "0.99"], "weight average"),
    (["--init-from", "ck", "--features", "f", "--embed-dim", "64"], "keeps the shape"),
    (["--features", "f", "--scst-samples", "3"], "it is a setting of --objective scst"),
    (["--features", "f", "--encoder-lr", "0.1"], "it is a setting of --objective finetune"),
    (["--objective", "finetune", "--init-from", "ck", "--features", "f"], "reads no feature cache"),
    (["--objective", "finetune", "--init-from", "ck", "--lr", "0.1"], "--encoder-lr and --decoder-lr"),
    (["--objective", "finetune", "--init-from", "ck", "--amp", "bf16"], "CNN fine-tuning runs in float32"),
    (["--objective", "scst", "--features", "f"], "give its checkpoint with --init-from"),
    (["--objective", "finetune"], "give its checkpoint with --init-from"),
    ([], "give the cache made by `captioner features` with --features"),
])
def test_a_flag_the_objective_would_not_use_is_refused(capsys, argv, message):
    err = refusal(capsys, *argv)
    assert err.startswith("captioner train: error: ") and message in err, err
    assert "leave it out" in err or "--init-from" in err or "--features" in err


def test_the_old_scst_flag_is_the_scst_objective_with_a_notice(capsys):
    err = refusal(capsys, "--scst", "--features", "f", "--amp", "bf16")
    assert "captioner train: --scst is deprecated; use --objective scst" in err and "SCST runs in float32" in err
    err = refusal(capsys, "--scst", "--objective", "xe", "--features", "f")
    assert "it does not go with --objective xe" in err


def test_old_spellings_of_finetune_and_features_say_what_replaces_them(capsys, tmp_path):
    assert main(["finetune", "ck.safetensors", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "`captioner finetune CKPT` is deprecated; use `captioner train --objective finetune --init-from CKPT`" \
        in capsys.readouterr().err
    assert main(["features", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "f"),
                 "--from-checkpoint", "a", "--checkpoint", "b"]) == 2
    err = capsys.readouterr().err
    assert "--from-checkpoint is deprecated; use --checkpoint" in err and "give one of them" in err


@pytest.mark.slow
@pytest.mark.shared_data
def test_scst_is_an_objective_of_the_one_train_command(tiny_run, tmp_path):
    out = tmp_path / "scst"
    assert main(["train", "--objective", "scst", "--init-from", str(tiny_run["checkpoint"]), "--data",
                 str(tiny_run["data"]), "--images", str(tiny_run["images"]), "--features", str(tiny_run["features"]),
                 "--out", str(out), "--epochs", "1", "--scst-batch-images", "30", "--scst-samples", "2",
                 "--val-images", "4", "--val-beam-size", "2"]) == 0
    log = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1] and log[1]["mean_reward"] is not None
