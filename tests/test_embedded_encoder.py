"""A checkpoint that carries its own (fine-tuned) CNN as `encoder.*` tensors: saved, exported, loaded and
evaluated with that CNN, never with the packaged weights or their feature caches."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT

from captioner.api import Captioner
from captioner.checkpoint import load_checkpoint, read_raw, save_checkpoint
from captioner.config import DecodeConfig
from captioner.data import load_dataset
from captioner.encoders import get_encoder, get_encoder_spec
from captioner.evaluation.evaluate import EvaluationSettings, evaluate_checkpoint
from captioner.features import record_features


@pytest.fixture(scope="module")
def own_cnn_checkpoint(tiny_run, tmp_path_factory):
    """The tiny run's decoder with a changed EfficientNet-Lite0 (its head scaled), float32."""
    state = get_encoder_spec("efficientnet_lite0").build().state_dict()
    state["model.conv_head.weight"] = state["model.conv_head.weight"] * 1.5
    checkpoint = load_checkpoint(tiny_run["checkpoint"])
    weights_hash = get_encoder("efficientnet_lite0", weights=state).weights_hash
    path = tmp_path_factory.mktemp("own-cnn") / "model.safetensors"
    save_checkpoint(path, checkpoint.model, checkpoint.vocab, {**checkpoint.encoder, "weights_hash": weights_hash},
                    checkpoint.info, encoder_state=state)
    return path, state, weights_hash


@pytest.mark.slow
def test_the_cnn_round_trips_and_loads_with_its_hash(own_cnn_checkpoint):
    path, state, weights_hash = own_cnn_checkpoint
    loaded = load_checkpoint(path)
    assert loaded.encoder_state.keys() == state.keys()
    assert all(torch.equal(loaded.encoder_state[k], v) for k, v in state.items())
    captioner = Captioner.from_pretrained(path, device="cpu")
    assert captioner.encoder.weights_hash == weights_hash != get_encoder("efficientnet_lite0").weights_hash
    plain = load_checkpoint(path)  # the same decoder saved without a CNN has none
    plain_path = path.parent / "plain.safetensors"
    save_checkpoint(plain_path, plain.model, plain.vocab, plain.encoder)
    assert load_checkpoint(plain_path).encoder_state is None


@pytest.mark.slow
def test_a_changed_cnn_fails_the_hash_check(own_cnn_checkpoint, tmp_path):
    path, state, weights_hash = own_cnn_checkpoint
    checkpoint = load_checkpoint(path)
    other = dict(state, **{"model.conv_stem.weight": state["model.conv_stem.weight"] + 0.1})
    bad = save_checkpoint(tmp_path / "bad.safetensors", checkpoint.model, checkpoint.vocab, checkpoint.encoder,
                          encoder_state=other)
    with pytest.raises(ValueError, match="hash"):
        Captioner.from_pretrained(bad, device="cpu")


@pytest.mark.slow
def test_evaluation_runs_its_cnn_and_refuses_packaged_caches(own_cnn_checkpoint, tiny_run):
    path, state, weights_hash = own_cnn_checkpoint
    dataset = load_dataset(tiny_run["data"], images_dir=tiny_run["images"])
    records = dataset.split("test")
    with pytest.raises(ValueError, match="weights"):
        evaluate_checkpoint(path, dataset, "test", DecodeConfig(),
                            EvaluationSettings(features_dirs=(tiny_run["features"],), quiet=True))
    ours = record_features(records, {"encoder": "efficientnet_lite0", "weights_hash": weights_hash}, [], 16,
                           torch.device("cpu"), state)[1]
    packaged = record_features(records, {"encoder": "efficientnet_lite0"}, [tiny_run["features"]], 16,
                               torch.device("cpu"))[1]
    assert not torch.allclose(ours, packaged, atol=1e-2)
    report = evaluate_checkpoint(path, dataset, "test", DecodeConfig(), EvaluationSettings(quiet=True))
    assert report["images"] == len(records) and 0 <= report["scores"]["CIDEr-D"]


@pytest.mark.slow
def test_export_keeps_the_cnn_in_float16_with_the_hash_it_loads_with(own_cnn_checkpoint, tmp_path):
    path, _, _ = own_cnn_checkpoint
    target = tmp_path / "exported.safetensors"
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "export_checkpoint.py"), str(path), str(target)],
                   check=True, capture_output=True)
    tensors, _ = read_raw(target)
    assert {v.dtype for k, v in tensors.items() if k.startswith("encoder.")} <= {torch.float16, torch.int64}
    captioner = Captioner.from_pretrained(target, device="cpu")  # the hash check passes
    assert captioner.encoder.weights_hash == load_checkpoint(target).encoder["weights_hash"]


@pytest.mark.slow
def test_features_command_runs_the_checkpoints_own_cnn(own_cnn_checkpoint, tiny_run, tmp_path, capsys):
    from captioner.apps.cli import main
    from captioner.features import FeatureCache

    path, state, weights_hash = own_cnn_checkpoint
    data = ["--data", str(tiny_run["data"]), "--images", str(tiny_run["images"]), "--splits", "test"]
    assert main(["features", *data, "--from-checkpoint", str(path), "--out", str(tmp_path / "own")]) == 0
    cache = FeatureCache.open(tmp_path / "own")
    assert cache.meta["weights_hash"] == weights_hash
    records = load_dataset(tiny_run["data"], images_dir=tiny_run["images"]).split("test")
    ours = record_features(records, {"encoder": "efficientnet_lite0", "weights_hash": weights_hash}, [], 16,
                           torch.device("cpu"), state)[1]
    assert torch.allclose(cache.get_batch([r.image_id for r in records]).float(), ours, atol=2e-2)
    # Given beside the packaged-weights cache, the cache of its own CNN is the one read.
    dataset = load_dataset(tiny_run["data"], images_dir=tiny_run["images"])
    from_caches = evaluate_checkpoint(path, dataset, "test", DecodeConfig(), EvaluationSettings(
        quiet=True, features_dirs=(tiny_run["features"], tmp_path / "own")))
    from_cnn = evaluate_checkpoint(path, dataset, "test", DecodeConfig(), EvaluationSettings(quiet=True))
    assert from_caches["scores"] == from_cnn["scores"]
    assert main(["features", *data, "--checkpoint", str(path), "--encoder", "efficientnet_lite0",
                 "--out", str(tmp_path / "both")]) == 2
    err = capsys.readouterr().err  # the first command used the old spelling, which still works
    assert "--from-checkpoint is deprecated; use --checkpoint" in err and "--checkpoint takes the CNN" in err
