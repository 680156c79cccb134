"""torchrun doors on the CPU (gloo, 2 processes): data-parallel training matches one process with the same
global batch, sharded feature extraction and captioning give the single-process files, and a DDP run
interrupted after an epoch and resumed ends with the weights of an uninterrupted one.

Each torchrun start costs a few seconds (two interpreters importing torch); the tiny dataset keeps the
rest short. Every subprocess has a timeout, and `--standalone` rendezvous binds a free port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT
from PIL import Image

from captioner import distributed
from captioner.api import Captioner
from captioner.apps import batch as batch_module
from captioner.apps.batch import BatchOptions, caption_paths
from captioner.apps.cli import main
from captioner.checkpoint import load_checkpoint, read_raw
from captioner.config import DecodeConfig
from captioner.decoding import decode_features
from captioner.train import autocast_dtype, cpu_bf16_lstm_supported

# Per-epoch mean token loss, 2 processes vs 1 with the same global batch, seed and dropout 0: the runs do
# the same arithmetic except the order of float32 sums (per rank, then the gradient all-reduce), which
# drifts the weights slightly. Measured here: 8e-9, 2e-8, 8e-8 over 3 epochs (losses ~2-3); allowed: 1e-5.
LOSS_TOLERANCE = 1e-5
TORCHRUN_TIMEOUT = 180
COLOURS = ["red", "green", "blue", "yellow", "black"]
THINGS = ["dog", "cat", "ball", "car"]


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if sys.platform == "linux":  # gloo on the loopback device: no dependence on how the hostname resolves
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)


def check(result: subprocess.CompletedProcess, status: int = 0) -> None:
    """torchrun exits 0 when every process did, else 1 (whatever the processes' own statuses)."""
    assert result.returncode == status, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    """19 generated JPEGs and one unreadable file in a Karpathy json: 14 train images with 41 captions
    (so the last global batch of 8 has one caption, and one rank gets none), 4 val, 2 test."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images = []
    for index in range(20):
        colour, thing = COLOURS[index % 5], THINGS[index % 4]
        name = f"img_{index:02d}.jpg"
        if index == 17:
            (root / "images" / name).write_text("not a photo")
        else:
            base = np.zeros((96, 128, 3)) + rng.uniform(0, 255, 3)
            pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / name, quality=90)
        split = "train" if index < 14 else "val" if index < 18 else "test"
        count = 2 if index == 0 else 3
        sentences = [{"raw": f"a {colour} {thing} {['sits', 'runs', 'waits'][k]} here ."} for k in range(count)]
        images.append({"filename": name, "imgid": index, "split": split, "sentences": sentences})
    (root / "dataset.json").write_text(json.dumps({"dataset": "toy", "images": images}))
    return {"data": root / "dataset.json", "images": root / "images", "root": root}


@pytest.fixture(scope="module")
def caches(dataset) -> dict[str, Path]:
    """The same cache built by one process (in this one) and by two under torchrun."""
    data = ["--data", str(dataset["data"]), "--images", str(dataset["images"]), "--batch-size", "4",
            "--device", "cpu"]
    single, sharded = dataset["root"] / "features-1", dataset["root"] / "features-2"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.warns(UserWarning, match="could not be loaded"):
            assert main(["features", *data, "--out", str(single)]) == 1  # 1: one image failed
    finally:
        torch.set_num_threads(threads)
    result = torchrun("-m", "captioner", "features", *data, "--out", str(sharded))
    check(result, status=1)
    return {"single": single, "sharded": sharded}


TRAIN_ARGS = ["--epochs", "3", "--batch-size", "8", "--lr", "0.2", "--seed", "3", "--min-word-count", "1",
              "--embed-dim", "16", "--hidden-dim", "24", "--image-dim", "16", "--dropout", "0",
              "--val-beam-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(dataset, caches) -> dict[str, Path]:
    """A 2-process DDP run and a 1-process run of the same settings."""
    data = ["--data", str(dataset["data"]), "--images", str(dataset["images"]), "--features", str(caches["single"])]
    single, ddp = dataset["root"] / "run-1", dataset["root"] / "run-2"
    check(torchrun("-m", "captioner", "train", *data, *TRAIN_ARGS, "--out", str(ddp)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *data, *TRAIN_ARGS, "--out", str(single)]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"single": single, "ddp": ddp}


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sharded_features_equal_the_single_process_cache(caches):
    single, sharded = caches["single"], caches["sharded"]
    assert sorted(p.name for p in sharded.iterdir()) == ["features.f16.npy", "index.json", "meta.json"]
    for name in ("features.f16.npy", "index.json"):
        assert (single / name).read_bytes() == (sharded / name).read_bytes(), name
    meta_single, meta_sharded = (json.loads((c / "meta.json").read_text()) for c in (single, sharded))
    meta_single.pop("created"), meta_sharded.pop("created")
    assert meta_single == meta_sharded
    assert [entry["image_id"] for entry in meta_sharded["failed"]] == ["img_17.jpg"]


@pytest.mark.slow
def test_ddp_losses_match_one_process_and_the_checkpoint_decodes(runs, caches):
    single, ddp = _log(runs["single"]), _log(runs["ddp"])
    assert [e["epoch"] for e in ddp] == [1, 2, 3]
    differences = [abs(a["train_loss"] - b["train_loss"]) for a, b in zip(single, ddp, strict=True)]
    print("per-epoch |loss(2 processes) - loss(1 process)|:", differences)
    assert max(differences) < LOSS_TOLERANCE, differences
    assert ddp[-1]["train_loss"] < ddp[0]["train_loss"]
    assert sorted(p.name for p in runs["ddp"].iterdir()) == ["best.safetensors", "curves.png", "last.safetensors",
                                                             "log.jsonl"]
    checkpoint = load_checkpoint(runs["ddp"] / "best.safetensors")
    assert checkpoint.info["world_size"] == 2 and checkpoint.info["seed"] == 3
    _, metadata = read_raw(runs["ddp"] / "last.safetensors")
    tensors, _ = read_raw(runs["ddp"] / "last.safetensors")
    assert {"rng.torch", "rng.torch.rank1"} <= set(tensors)
    from captioner.features import FeatureCache

    features = FeatureCache.open(caches["single"]).get_batch(["img_14.jpg", "img_15.jpg"])
    captions = decode_features(checkpoint.model, checkpoint.vocab, features, DecodeConfig(strategy="greedy"))
    assert all(c[0].text for c in captions)


RESUME_SCRIPT = """
import sys
import torch
from captioner import distributed
from captioner.config import DecodeConfig, ModelConfig, TrainConfig
from captioner.data import load_dataset
from captioner.checkpoint import load_checkpoint, read_raw
from captioner.features import FeatureCache
from captioner.decoding import decode_features
from captioner.evaluation.validate import decode_across_ranks
from captioner.train import train_on_cache

data, images, features, out = sys.argv[1:5]
dataset = load_dataset(data, images_dir=images)
config = TrainConfig(epochs=3, batch_size=8, lr=0.2, seed=5, min_word_count=1,
                     val_decode=DecodeConfig(strategy="beam", beam_size=2, max_length=8))
model = ModelConfig(embed_dim=16, hidden_dim=24, image_dim=16, dropout=0.3)


def stop(entry):
    if entry["epoch"] == 1:
        raise KeyboardInterrupt


with distributed.session(torch.device("cpu")):
    train_on_cache(dataset, features, out + "/straight", model, config, progress=False)
    try:
        train_on_cache(dataset, features, out + "/interrupted", model, config, progress=False, on_epoch_end=stop)
    except KeyboardInterrupt:
        pass
    train_on_cache(dataset, features, out + "/interrupted", model, config, resume=True, progress=False)
    # Val decoding split over the ranks gives every rank all captions, in order.
    checkpoint = load_checkpoint(out + "/straight/best.safetensors")
    rows = FeatureCache.open(features).get_batch([f"img_{i:02d}.jpg" for i in range(7)])
    decode = DecodeConfig(strategy="beam", beam_size=2, max_length=8)
    shared = decode_across_ranks(checkpoint.model, checkpoint.vocab, rows, decode)
    alone = [c[0].text for c in decode_features(checkpoint.model, checkpoint.vocab, rows, decode)]
    assert shared == alone, (shared, alone)
    if distributed.is_main():
        print("distinct captions:", len(set(alone)))
        straight, _ = read_raw(out + "/straight/last.safetensors")
        resumed, _ = read_raw(out + "/interrupted/last.safetensors")
        differing = [k for k in straight if k.startswith("model.") and not torch.equal(straight[k], resumed[k])]
        print("differing weights:", differing)
        sys.exit(1 if differing else 0)
"""


@pytest.mark.slow
def test_interrupted_ddp_run_resumes_to_the_same_weights(dataset, caches, tmp_path):
    """Dropout 0.3 on: every rank's random state must be saved and restored for the weights to agree."""
    script = tmp_path / "resume_run.py"
    script.write_text(RESUME_SCRIPT)
    result = torchrun(str(script), str(dataset["data"]), str(dataset["images"]), str(caches["single"]),
                      str(tmp_path))
    check(result)
    assert "differing weights: []" in result.stdout
    assert "distinct captions: 1\n" not in result.stdout  # the order check above would be empty
    log = _log(tmp_path / "interrupted")
    assert [e["epoch"] for e in log] == [1, 2, 3]


@pytest.mark.slow
def test_sharded_captioning_equals_one_process_and_resumes(dataset, runs, tmp_path):
    checkpoint = runs["ddp"] / "best.safetensors"
    folder = dataset["images"]
    expected_file = tmp_path / "single.jsonl"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = caption_paths([str(folder)], Captioner.from_pretrained(checkpoint, device="cpu"),
                               DecodeConfig(strategy="beam", beam_size=2),
                               BatchOptions(output=expected_file, batch_size=3, progress=False))
    finally:
        torch.set_num_threads(threads)
    assert status == 1  # img_17.jpg is not an image
    expected = [json.loads(line) for line in expected_file.read_text().splitlines()]
    assert [row["image"] for row in expected] == sorted(str(p) for p in folder.iterdir())

    arguments = ["-m", "captioner", "caption", str(folder), "--checkpoint", str(checkpoint), "--beam-size", "2",
                 "--batch-size", "3", "--device", "cpu"]
    output = tmp_path / "sharded.jsonl"
    check(torchrun(*arguments, "--output", str(output)), status=1)
    assert [json.loads(line) for line in output.read_text().splitlines()] == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.jsonl", "single.jsonl"]

    # An interrupted sharded run, finished by one process (the same merge code, no torchrun start):
    # 4 rows already merged, 5 more in the rank file of a 3-process run.
    captioner = Captioner.from_pretrained(checkpoint, device="cpu")
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text("".join(json.dumps(row) + "\n" for row in expected[:4]))
    batch_module.rank_file(resumed, 2).write_text("".join(json.dumps(row) + "\n" for row in expected[10:15]))
    with pytest.raises(ValueError, match="already exists; pass --resume"):
        batch_module.caption_paths_sharded([str(folder)], captioner, DecodeConfig(strategy="beam", beam_size=2),
                                           BatchOptions(output=resumed, batch_size=3, progress=False))
    torch.set_num_threads(1)
    try:
        status = batch_module.caption_paths_sharded([str(folder)], captioner,
                                                   DecodeConfig(strategy="beam", beam_size=2),
                                                   BatchOptions(output=resumed, resume=True, batch_size=3,
                                                                progress=False))
    finally:
        torch.set_num_threads(threads)
    assert status == 1
    assert [json.loads(line) for line in resumed.read_text().splitlines()] == expected
    assert not batch_module.rank_file(resumed, 2).exists() and not batch_module.rank_file(resumed, 0).exists()


def test_shard_batches_cover_every_position_once_in_whole_batches():
    shares = [distributed.shard_batches(11, 3, shard, 2) for shard in range(2)]
    assert shares == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10]]
    assert sorted(sum((distributed.shard_batches(7, 2, k, 3) for k in range(3)), [])) == list(range(7))
    assert distributed.shard_batches(5, 4) == [0, 1, 2, 3, 4]  # outside torchrun: everything


@pytest.mark.slow
def test_amp_rules_and_bf16_on_cpu(tmp_path):
    cpu = torch.device("cpu")
    assert autocast_dtype(None, cpu) is None
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        autocast_dtype("fp8", cpu)
    if not cpu_bf16_lstm_supported():
        with pytest.raises(ValueError, match="cannot run an LSTM in bfloat16"):
            autocast_dtype("bf16", cpu)
        pytest.skip("this CPU's oneDNN has no bfloat16 LSTM (AVX2 only): the refusal is checked, training is not")
    assert autocast_dtype("bf16", cpu) == torch.bfloat16

    from captioner.config import ModelConfig, TrainConfig
    from captioner.data.records import CaptionRecord
    from captioner.train import train

    generator = torch.Generator().manual_seed(0)
    records = [CaptionRecord(f"{i}.jpg", f"/nowhere/{i}.jpg", ["a dog runs .", "a cat sits here ."], "train")
               for i in range(6)]
    features = torch.randn(6, 8, generator=generator)
    config = TrainConfig(epochs=2, batch_size=4, lr=1e-2, warmup_steps=1, min_word_count=1, seed=1,
                         val_decode=DecodeConfig(strategy="greedy", max_length=6))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(records, features, records[:2], features[:2], tmp_path, ModelConfig(embed_dim=8, hidden_dim=8,
              image_dim=8), config, progress=False, amp="bf16")
    finally:
        torch.set_num_threads(threads)
    log = _log(tmp_path)
    assert all(np.isfinite(e["train_loss"]) for e in log) and log[-1]["train_loss"] < log[0]["train_loss"]
    assert load_checkpoint(tmp_path / "best.safetensors").info["amp"] == "bf16"


@pytest.mark.slow
def test_one_process_finishes_an_interrupted_sharded_extraction(dataset, caches, tmp_path, monkeypatch):
    """Rank 1 of an earlier 2-process run wrote one batch, then the run stopped; a single process picks
    that up and the merged cache is still the single-process one, byte for byte."""
    from captioner.data import load_dataset
    from captioner.encoders import get_encoder
    from captioner.features import cache as cache_module
    from captioner.features import extract as extract_module
    from captioner.features import loader as loader_module

    records = load_dataset(dataset["data"], images_dir=dataset["images"]).records
    encoder = get_encoder("efficientnet_lite0")
    out = tmp_path / "cache"
    out.mkdir()
    fingerprint = cache_module.cache_fingerprint(encoder)
    partial = cache_module.PartialCache.resume_or_create(out / "partial.rank1", fingerprint, seed=None)
    batch = records[4:8]  # the batch rank 1 owns with --batch-size 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        [loaded] = list(loader_module.image_loader([r.image_path for r in batch], encoder, batch_size=4))
        with torch.inference_mode():
            rows = cache_module.to_float16(encoder.model(loaded.images), [r.image_id for r in batch])
        partial.append([r.image_id for r in batch], rows, [])
        partial.close()
        loads = []
        original = loader_module.load_image
        monkeypatch.setattr(loader_module, "load_image",
                            lambda path, **kwargs: loads.append(Path(path).name) or original(path, **kwargs))
        with pytest.warns(UserWarning, match="could not be loaded"):
            extract_module.extract_features(records, encoder, out, batch_size=4, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert not set(loads) & {r.image_id for r in batch}  # rank 1's batch was not redone
    assert sorted(p.name for p in out.iterdir()) == ["features.f16.npy", "index.json", "meta.json"]
    for name in ("features.f16.npy", "index.json"):
        assert (out / name).read_bytes() == (caches["single"] / name).read_bytes(), name
