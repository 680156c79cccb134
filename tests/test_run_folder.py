"""What `captioner train`, `features` and `memory` may do to what they wrote before: nothing is replaced
unless asked (`--resume` continues, `--overwrite` replaces, anything else is refused in one line naming the
folder and the flag), a resume checks its run folder (training state present, best checkpoint readable,
settings the same, each differing one named), and Ctrl-C says the exact rerun that continues.

Synthetic data (tests/helpers.py: `synthetic_training_data`): empty image files and random cached features,
so no photo is read and no CNN runs."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from helpers import synthetic_training_data, train_argv

from captioner.apps import cli, commands, training
from captioner.apps.cli import main
from captioner.checkpoint import load_checkpoint, read_raw
from captioner.train import BEST, LAST, LOG, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def data(tmp_path):
    return synthetic_training_data(tmp_path / "data")


def error_line(capsys) -> str:
    """The one line a refused command printed on stderr."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def log_epochs(run) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / LOG).read_text().splitlines()]


def weights(path) -> dict[str, torch.Tensor]:
    tensors, _ = read_raw(path)
    return {name: value for name, value in tensors.items() if name.startswith("model.")}


@pytest.mark.slow
def test_a_new_run_refuses_a_folder_holding_one_and_overwrite_replaces_it(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data, run, epochs=2)) == 0
    before = {name: (run / name).read_bytes() for name in (BEST, LAST, LOG)}
    assert main(train_argv(data, run, epochs=1)) == 2  # the probe: no --resume, fewer epochs
    assert error_line(capsys) == (f"captioner train: error: {run}: holds a training run (last.safetensors, "
                                  "best.safetensors, log.jsonl, curves.png); continue it with --resume, replace it "
                                  "with --overwrite, or give another --out")
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing touched
    (run / "notes.txt").write_text("mine")
    assert main(train_argv(data, run, "--overwrite", epochs=1)) == 0
    assert "--overwrite: removed the previous run's" in capsys.readouterr().out
    assert log_epochs(run) == [1] and (run / "notes.txt").read_text() == "mine"  # only the run's files go


def test_resume_and_overwrite_together_and_a_file_as_out_are_refused(data, tmp_path, capsys):
    assert main(train_argv(data, tmp_path / "run", "--resume", "--overwrite")) == 2
    assert "--resume continues the run there and --overwrite replaces it; give one of them" in error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert main(train_argv(data, tmp_path / "file")) == 2
    assert "a file, not a folder; give a folder for the run as --out" in error_line(capsys)


def test_resume_without_the_training_state_does_not_start_over_the_best(data, tmp_path, capsys):
    """The issue's probe: last.safetensors gone, --resume used to say "starting a new run" and replace best."""
    run = tmp_path / "run"
    run.mkdir()
    (run / BEST).write_bytes(b"the best weights")
    (run / LOG).write_text("{}\n")
    assert main(train_argv(data, run, "--resume")) == 2
    assert error_line(capsys) == (f"captioner train: error: {run}: nothing to resume from: last.safetensors, the "
                                  "run's training state, is missing (the folder holds best.safetensors, log.jsonl); "
                                  "start the run again with --overwrite, which replaces them, or give another --out")
    assert (run / BEST).read_bytes() == b"the best weights"


@pytest.mark.slow
def test_resume_into_an_empty_folder_starts_the_run(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data, run, "--resume", epochs=1)) == 0  # what scripts that always resume rely on
    assert f"nothing to resume in {run}: starting a new run" in capsys.readouterr().out
    assert log_epochs(run) == [1]


@pytest.mark.parametrize("objective", [
    ["--objective", "scst", "--init-from", "ck.safetensors", "--features", "f"],
    ["--objective", "finetune", "--init-from", "ck.safetensors"],
])
def test_scst_and_finetune_hold_the_same_promise(objective, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / BEST).write_bytes(b"kept")
    assert main(["train", "--data", "/nonexistent", "--out", str(run), *objective]) == 2  # before any data is read
    assert "holds a training run (best.safetensors); continue it with --resume, replace it with --overwrite" \
        in error_line(capsys)
    assert main(["finetune", "ck.safetensors", "--data", "/nonexistent", "--out", str(run)]) == 2
    assert "holds a training run" in capsys.readouterr().err and (run / BEST).read_bytes() == b"kept"


@pytest.mark.slow
def test_resume_names_each_setting_that_differs(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data, run, epochs=1)) == 0
    capsys.readouterr()
    assert main(train_argv(data, run, "--resume", "--lr", "0.1", epochs=1)) == 2
    assert error_line(capsys) == (f"captioner train: error: {run / LAST}: the run was started with other settings "
                                  "(lr 0.002 in the run, 0.1 now); resume it with the run's settings, or start again "
                                  "with --overwrite (or give another --out)")
    assert main(train_argv(data, run, "--resume", epochs=1, dim=12)) == 2  # another decoder shape
    err = error_line(capsys)
    assert "embed_dim 8 in the run, 12 now; hidden_dim 8 in the run, 12 now; image_dim 8 in the run, 12 now" in err


@pytest.mark.slow
def test_resume_with_more_epochs_of_cross_entropy_says_why_it_cannot_and_what_to_do(data, tmp_path, capsys):
    """The issue's probe: `--resume --epochs 4` on a finished 2-epoch run said only "train_config differ". The
    learning rate decays over the run's epochs, so the 4-epoch run is not the 2-epoch run continued: refused."""
    run = tmp_path / "run"
    assert main(train_argv(data, run, epochs=2)) == 0
    capsys.readouterr()
    assert main(train_argv(data, run, "--resume", epochs=4)) == 2
    assert error_line(capsys) == (
        f"captioner train: error: {run / LAST}: the run was started for 2 epochs, not 4, and its epochs cannot "
        "change on resume: its learning rate follows one warm-up and cosine decay over all the run's epochs, so a "
        "run continued to other epochs would not be the run of that many epochs; to train 4 epochs start again "
        f"with --overwrite, or train on from its best with --init-from {run / BEST} and another --out")
    # the advice works: a warm start from the run folder (its best) into another folder
    assert main(train_argv(data, tmp_path / "more", "--init-from", str(run), epochs=1, dim=None)) == 0
    assert load_checkpoint(tmp_path / "more").info["init_checkpoint"] == "run/best.safetensors"


@pytest.mark.slow
def test_resume_of_a_finished_run_rewrites_a_truncated_best_it_can_and_refuses_one_it_cannot(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data, run, epochs=2)) == 0
    history = [json.loads(line) for line in (run / LOG).read_text().splitlines()]
    best_epoch = max(history, key=lambda entry: entry["val"]["CIDEr-D"])["epoch"]
    good = (run / BEST).read_bytes()
    (run / BEST).write_bytes(good[:len(good) // 2])  # truncated
    capsys.readouterr()
    code = main(train_argv(data, run, "--resume", epochs=2))
    captured = capsys.readouterr()
    if best_epoch == 2:  # the last epoch saved is the best: last.safetensors holds its weights
        assert code == 0 and f"{run / BEST}: unreadable" in captured.out and "written again from" in captured.out
        assert load_checkpoint(run).info["epoch"] == 2
        for name, value in weights(run / LAST).items():
            assert torch.equal(value, weights(run / BEST)[name]), name
    else:  # its weights are gone: said, and not reported as the best checkpoint
        assert code == 2 and "best checkpoint" not in captured.out
        assert f"{run / BEST}: unreadable" in captured.err and "are lost" in captured.err
    # either way, a finished run whose best is whole resumes to nothing, exit 0, and says so
    (run / BEST).write_bytes(good)
    assert main(train_argv(data, run, "--resume", epochs=2)) == 0
    assert "the run has trained its 2 epochs; nothing left to do" in capsys.readouterr().out


@pytest.mark.slow
def test_ctrl_c_names_the_rerun_that_continues_and_the_rerun_does(data, tmp_path, capsys, monkeypatch):
    straight = tmp_path / "straight"
    assert main(train_argv(data, straight, epochs=2)) == 0
    finish = Trainer._finish_epoch

    def stop_after_epoch_1(self, entry, raw_scores):
        finish(self, entry, raw_scores)
        if entry["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_finish_epoch", stop_after_epoch_1)
    run = tmp_path / "run"
    argv = train_argv(data, run, epochs=2)
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    prefix = "captioner train: interrupted; the epochs finished so far are saved in --out; continue with: "
    assert err.startswith(prefix), err
    rerun = shlex.split(err[len(prefix):])
    assert rerun == ["captioner", *argv, "--resume"]
    monkeypatch.setattr(Trainer, "_finish_epoch", finish)
    assert main(rerun[1:]) == 0
    assert log_epochs(run) == [1, 2]
    for name, value in weights(straight / LAST).items():  # the interrupted run ends as the uninterrupted one
        assert torch.equal(value, weights(run / LAST)[name]), name


def test_the_interrupt_message_of_each_command(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "cmd_train", interrupted)
    monkeypatch.setattr(commands, "cmd_features", interrupted)
    monkeypatch.setattr(commands, "cmd_info", interrupted)
    assert main(["train", "--data", "my data", "--features", "f", "--out", "r", "--overwrite"]) == 130
    assert capsys.readouterr().err.strip().endswith(
        "continue with: captioner train --data 'my data' --features f --out r --resume")  # --overwrite dropped
    assert main(["features", "--data", "d", "--out", "f", "--resume"]) == 130
    assert capsys.readouterr().err.strip() == ("captioner features: interrupted; the features computed so far are "
                                               "kept in --out; continue with: captioner features --data d --out f "
                                               "--resume")
    assert main(["info", "x"]) == 130 and capsys.readouterr().err.strip() == "captioner info: interrupted"
    assert cli.interrupted_message("finetune", ["finetune", "ck", "--out", "r"]).endswith(
        "captioner finetune ck --out r --resume")


def test_features_refuse_a_folder_holding_a_cache_unless_asked(data, tmp_path, capsys):
    argv = ["features", "--data", str(data["data"]), "--out", str(data["features"])]
    before = (data["features"] / "meta.json").read_bytes()
    assert main(argv) == 2
    assert error_line(capsys) == (f"captioner features: error: {data['features']}: holds a feature cache (meta.json, "
                                  "features.f16.npy, index.json); continue or extend it with --resume, replace it with "
                                  "--overwrite, or give another --out")
    assert main([*argv, "--resume", "--overwrite"]) == 2
    assert "give one of them" in error_line(capsys)
    interrupted = tmp_path / "interrupted"
    (interrupted / "partial").mkdir(parents=True)
    assert main(["features", "--data", str(data["data"]), "--out", str(interrupted)]) == 2
    assert "holds an interrupted feature extraction (partial); continue or extend it with --resume" \
        in error_line(capsys)
    assert (data["features"] / "meta.json").read_bytes() == before


@pytest.mark.slow
def test_features_resume_extends_and_overwrite_replaces(tmp_path, capsys):
    """With real (tiny) photos: --resume adds what a finished cache lacks, a cache of another CNN is refused
    naming --overwrite, and --overwrite rebuilds it with that CNN."""
    from PIL import Image
    from safetensors.torch import save_file

    from captioner.encoders import get_encoder_spec
    from captioner.features import FeatureCache

    images = tmp_path / "images"
    images.mkdir()
    entries = []
    for i in range(3):
        Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(images / f"p{i}.jpg")
        entries.append({"filename": f"p{i}.jpg", "split": "train" if i else "test", "sentences": [{"raw": "a photo"}]})
    (tmp_path / "dataset_p.json").write_text(json.dumps({"images": entries}))
    argv = ["features", "--data", str(tmp_path / "dataset_p.json"), "--out", str(tmp_path / "cache"),
            "--device", "cpu"]
    assert main([*argv, "--splits", "train"]) == 0
    assert len(FeatureCache.open(tmp_path / "cache")) == 2
    assert main([*argv, "--resume"]) == 0  # the test image is added
    first = FeatureCache.open(tmp_path / "cache")
    assert len(first) == 3
    state = {name.removeprefix("model."): value * 1.01 if value.is_floating_point() else value
             for name, value in get_encoder_spec("efficientnet_lite0").build().state_dict().items()}
    save_file(state, str(tmp_path / "other.safetensors"))  # another CNN: other weights, another hash
    other = [*argv, "--encoder-weights", str(tmp_path / "other.safetensors")]
    capsys.readouterr()
    assert main([*other, "--resume"]) == 2
    err = error_line(capsys)
    assert "Refusing to mix them" in err and "(captioner features --overwrite)" in err
    assert FeatureCache.open(tmp_path / "cache").meta["weights_hash"] == first.meta["weights_hash"]
    assert main([*other, "--overwrite"]) == 0
    assert "--overwrite: removed the previous cache's meta.json, features.f16.npy, index.json" in capsys.readouterr().err
    cache = FeatureCache.open(tmp_path / "cache")
    assert cache.meta["weights_hash"] != first.meta["weights_hash"] and len(cache) == 3


@pytest.mark.slow
def test_memory_refuses_an_existing_file_unless_overwrite(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data, run, epochs=1)) == 0
    memory = tmp_path / "memories" / "memory.safetensors"  # its folder is made
    argv = ["memory", "--data", str(data["data"]), "--checkpoint", str(run), "--features", str(data["features"]),
            "--out", str(memory)]
    assert main(argv) == 0 and memory.is_file()
    before = memory.read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    assert error_line(capsys) == (f"captioner memory: error: {memory}: a file is already there; replace it with "
                                  "--overwrite, or give another --out")
    assert memory.read_bytes() == before
    assert main([*argv, "--overwrite"]) == 0
    assert main([*argv[:-1], str(memory.parent)]) == 2
    assert "a folder; give the memory's file name as --out" in error_line(capsys)


@pytest.mark.slow
def test_a_run_folder_that_cannot_be_made_is_one_line(data, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "run"  # its parent is a file: the folder cannot be made
    assert main(train_argv(data, out, epochs=1)) == 2
    assert error_line(capsys) == (f"captioner train: error: {out}: Not a directory; a part of the path is a file, "
                                  "not a folder: check the path")
