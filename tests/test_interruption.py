"""Interrupted runs lose no finished work: `captioner train`, `captioner caption` and `captioner features`
are killed with SIGKILL part-way (at a moment drawn from a fixed seed, so failures reproduce), and the run
resumed with `--resume` (or simply run again, for features) finishes with what an uninterrupted run gives.

The data is a small synthetic Karpathy-format dataset made here; the caption checkpoint is conftest's toy one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.apps.cli import main
from captioner.checkpoint import load_checkpoint, read_raw
from captioner.features import loader as loader_module

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 20260
WORDS = ["dog", "cat", "man", "woman", "child", "runs", "sits", "jumps", "on", "in", "the", "grass", "beach",
         "snow", "red", "blue", "ball", "water"]
EPOCHS = 8
TRAIN_ARGS = ["--epochs", str(EPOCHS), "--batch-size", "8", "--min-word-count", "1", "--embed-dim", "16",
              "--hidden-dim", "24", "--image-dim", "16", "--val-beam-size", "2", "--patience", "100", "--seed", "3"]

# one torch thread: the same float results as the 1-thread subprocesses; slow: every test runs and kills them
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

# Run `captioner` with checkpoint writes that SIGKILL the process half-way through the Nth write of
# last.safetensors: half the bytes are in the temporary file when the process dies.
KILL_MID_SAVE = """
import os, signal, sys
from pathlib import Path

import captioner.checkpoint as checkpoint
from captioner.apps.cli import main

kill_at = int(os.environ["KILL_AT_LAST_SAVE"])
real_save_file = checkpoint.save_file
saves = 0


def save_file_then_die(tensors, filename, metadata=None):
    global saves
    if Path(filename).name.startswith(".last.safetensors."):
        saves += 1
        if saves == kill_at:
            real_save_file(tensors, filename, metadata=metadata)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    real_save_file(tensors, filename, metadata=metadata)


checkpoint.save_file = save_file_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """24 small generated photos (16 train, 4 val, 4 test, one of the test ones unreadable) with two
    captions each, and their feature cache made by an uninterrupted `captioner features`."""
    folder = tmp_path_factory.mktemp("synthetic")
    (folder / "images").mkdir()
    rng = np.random.default_rng(SEED)
    entries = []
    for index in range(24):
        name = f"photo_{index:02d}.jpg"
        if index == 23:
            (folder / "images" / name).write_text("not a photo after all")
        else:
            y, x = np.mgrid[0:48, 0:64]
            base = np.stack([x * 4, y * 5, np.full_like(x, index * 10)], axis=-1)
            pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / "images" / name, quality=90)
        split = "train" if index < 16 else "val" if index < 20 else "test"
        sentences = [{"raw": "a " + " ".join(rng.choice(WORDS, 5))} for _ in range(2)]
        entries.append({"filename": name, "imgid": index, "split": split, "sentences": sentences})
    data = folder / "dataset_synthetic.json"
    data.write_text(json.dumps({"dataset": "synthetic", "images": entries}))
    with pytest.warns(UserWarning, match="1 image"):
        assert main(["features", "--data", str(data), "--out", str(folder / "features"), "--batch-size", "2"]) == 1
    return {"data": data, "images": folder / "images", "features": folder / "features",
            "names": sorted(p.name for p in (folder / "images").iterdir())}


def captioner_process(args: list[str], log: Path, script: str | None = None,
                      env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m captioner ARGS` (or `python -c SCRIPT ARGS`) on one thread, output to `log`."""
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "captioner", *args]
    with open(log, "w") as output:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for(process: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float = 120) -> None:
    """Poll until `ready()` holds; fail if the process ends first (the planned kill moment never came)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before the planned kill:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the planned kill moment did not come within {timeout} s:\n{log.read_text()}")
        time.sleep(0.005)


def kill(process: subprocess.Popen, log: Path, delay: float = 0.0) -> None:
    """SIGKILL after `delay` seconds, and check the process was still running to receive it."""
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, f"the run finished before the kill:\n{log.read_text()}"


def complete_lines(path: Path) -> list[str]:
    """Lines of a file that were written up to their newline (a kill may leave half of the last one)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return data[: data.rfind(b"\n") + 1].decode("utf-8").splitlines(keepends=True)


def record_loaded_images(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """File names of the images decoded from now on (by the batch loader, as `caption` and `features` use it)."""
    loaded: list[str] = []
    real_load_image = loader_module.load_image

    def recording(path, **kwargs):
        loaded.append(Path(path).name)
        return real_load_image(path, **kwargs)

    monkeypatch.setattr(loader_module, "load_image", recording)
    return loaded


# --------------------------------------------------------------------------------------------- train
def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_raw(path)[0].items() if k.startswith("model.")}


def trained_epoch(run: Path) -> int:
    return json.loads(read_raw(run / "last.safetensors")[1]["training_state"])["epoch"]


def check_run_is_usable(run: Path) -> int:
    """After a kill: last.safetensors is a whole training state, best.safetensors loads, the log parses."""
    epoch = trained_epoch(run)
    load_checkpoint(run / "best.safetensors")
    logged = [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged in (list(range(1, epoch + 1)), list(range(1, epoch)))  # the log is written just after
    return epoch


def test_training_killed_at_a_random_moment_resumes_to_the_uninterrupted_result(synthetic, tmp_path, capsys):
    rng = random.Random(SEED)
    epochs_before_kill, fraction = rng.randint(2, 4), rng.random()
    data = ["--data", str(synthetic["data"]), "--features", str(synthetic["features"])]
    run, log = tmp_path / "run", tmp_path / "train.log"
    process = captioner_process(["train", *data, "--out", str(run), *TRAIN_ARGS], log)

    def logged() -> int:
        return len(complete_lines(run / "log.jsonl"))

    # The kill lands `fraction` of an epoch's time after epoch `epochs_before_kill` is logged: in training,
    # validation, a checkpoint write or the plot, wherever that falls on this machine.
    wait_for(process, lambda: logged() >= epochs_before_kill - 1, log)
    started = time.monotonic()
    wait_for(process, lambda: logged() >= epochs_before_kill, log)
    kill(process, log, delay=fraction * (time.monotonic() - started))

    survived = check_run_is_usable(run)
    assert epochs_before_kill <= survived < EPOCHS
    assert main(["train", *data, "--out", str(run), *TRAIN_ARGS, "--resume"]) == 0
    assert f"resuming {run} after epoch {survived}" in capsys.readouterr().out
    assert trained_epoch(run) == EPOCHS
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == \
        list(range(1, EPOCHS + 1))

    straight = tmp_path / "straight"
    assert main(["train", *data, "--out", str(straight), *TRAIN_ARGS]) == 0
    resumed, uninterrupted = model_tensors(run / "last.safetensors"), model_tensors(straight / "last.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


def test_training_killed_while_writing_a_checkpoint_keeps_the_previous_one(synthetic, tmp_path, capsys):
    kill_at = random.Random(SEED + 1).randint(2, 5)  # during epoch kill_at's write of last.safetensors
    data = ["--data", str(synthetic["data"]), "--features", str(synthetic["features"])]
    run, log = tmp_path / "run", tmp_path / "train.log"
    process = captioner_process(["train", *data, "--out", str(run), *TRAIN_ARGS], log, script=KILL_MID_SAVE,
                                env={"KILL_AT_LAST_SAVE": str(kill_at)})
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL, log.read_text()

    half_written = list(run.glob(".last.safetensors.*.tmp"))
    assert len(half_written) == 1 and half_written[0].stat().st_size > 0  # the kill did land mid-write
    assert check_run_is_usable(run) == kill_at - 1  # the previous checkpoint, whole

    assert main(["train", *data, "--out", str(run), *TRAIN_ARGS, "--resume"]) == 0
    assert f"after epoch {kill_at - 1}" in capsys.readouterr().out
    assert trained_epoch(run) == EPOCHS
    load_checkpoint(run / "best.safetensors")

    # A last.safetensors damaged some other way (a partial copy) is refused with a clear message.
    (run / "last.safetensors").write_bytes((run / "last.safetensors").read_bytes()[:3000])
    assert main(["train", *data, "--out", str(run), *TRAIN_ARGS, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "last.safetensors" in err and "truncated or corrupted" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- caption
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_caption_killed_mid_run_resumes_without_redoing_finished_images(synthetic, toy_checkpoint, tmp_path,
                                                                        monkeypatch, suffix):
    rows_before_kill = random.Random(f"{SEED}{suffix}").randint(3, 10)
    header_lines = 1 if suffix == ".csv" else 0
    output, log = tmp_path / f"results{suffix}", tmp_path / "caption.log"
    args = ["caption", str(synthetic["images"]), "--checkpoint", str(toy_checkpoint), "--output", str(output),
            "--strategy", "greedy", "--batch-size", "1", "--decode-batch-size", "1"]  # a row per image
    process = captioner_process(args, log)
    wait_for(process, lambda: len(complete_lines(output)) >= header_lines + rows_before_kill, log)
    kill(process, log)

    written = complete_lines(output)
    done = [row["image"] for row in parse(written, suffix)]  # every finished line is valid JSON / CSV
    assert len(done) >= rows_before_kill and len(set(done)) == len(done)

    loaded = record_loaded_images(monkeypatch)
    assert main([*args, "--resume"]) == 1  # 1: the unreadable photo_23.jpg
    final = complete_lines(output)
    assert final[:len(written)] == written  # what was written before the kill is kept byte for byte
    rows = parse(final, suffix)
    assert sorted(Path(row["image"]).name for row in rows) == synthetic["names"]  # each image exactly once
    assert sorted(loaded) == sorted(set(synthetic["names"]) - {Path(image).name for image in done})
    assert all(row["caption"] for row in rows if not row["image"].endswith("photo_23.jpg"))


def parse(lines: list[str], suffix: str) -> list[dict]:
    if suffix == ".jsonl":
        return [json.loads(line) for line in lines]
    return list(csv.DictReader(io.StringIO("".join(lines))))


# ------------------------------------------------------------------------------------------ features
def test_features_killed_mid_run_resume_to_the_uninterrupted_cache(synthetic, tmp_path, monkeypatch):
    from captioner.features import FeatureCache

    batches_before_kill = random.Random(SEED + 2).randint(2, 8)
    cache, log = tmp_path / "features", tmp_path / "features.log"
    args = ["features", "--data", str(synthetic["data"]), "--out", str(cache), "--batch-size", "2"]
    process = captioner_process(args, log)
    batch_log = cache / "partial" / "batches.jsonl"
    wait_for(process, lambda: len(complete_lines(batch_log)) >= batches_before_kill, log)
    kill(process, log)

    batches = [json.loads(line) for line in complete_lines(batch_log)]
    done = {image_id for batch in batches for image_id in batch["ids"]}
    done |= {entry["image_id"] for batch in batches for entry in batch["failed"]}
    loaded = record_loaded_images(monkeypatch)
    assert main(args) == 2  # run again as it was: the interrupted extraction is not replaced unasked
    with pytest.warns(UserWarning, match="1 image"):
        assert main([*args, "--resume"]) == 1  # it resumes; 1 for the unreadable photo_23.jpg
    assert sorted(loaded) == sorted(set(synthetic["names"]) - done)

    resumed, reference = FeatureCache.open(cache), FeatureCache.open(synthetic["features"])
    assert resumed.index == reference.index and resumed.failed == reference.failed
    assert np.array_equal(np.asarray(resumed.features), np.asarray(reference.features))
    assert not (cache / "partial").exists()
