"""Checkpoint round trip, and each way a checkpoint can be bad gives a specific error."""

import json
import os
import pickle
import random

import pytest
import torch
from safetensors.torch import save_file

from captioner.checkpoint import CheckpointError, load_checkpoint, read_raw, save_checkpoint
from captioner.config import ModelConfig
from captioner.model import CaptionDecoder
from captioner.text import Vocabulary

ENCODER = {"name": "efficientnet_lite0", "weights_hash": "abc"}


@pytest.fixture
def saved(tmp_path):
    vocab = Vocabulary.build([["a", "dog"], ["a", "cat"]], min_count=1)
    model = CaptionDecoder(ModelConfig(vocab_size=len(vocab), feature_dim=16, embed_dim=8, hidden_dim=12, image_dim=8))
    path = save_checkpoint(tmp_path / "model.safetensors", model, vocab, ENCODER, {"seed": 3})
    return path, model, vocab


def _rewrite(path, mutate_metadata=None, mutate_tensors=None):
    tensors, metadata = read_raw(path)
    if mutate_metadata:
        mutate_metadata(metadata)
    if mutate_tensors:
        mutate_tensors(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_round_trip(saved):
    path, model, vocab = saved
    loaded = load_checkpoint(path.parent)  # a folder holding model.safetensors works too
    assert loaded.vocab.words == vocab.words and loaded.encoder == ENCODER and loaded.info == {"seed": 3}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    assert not loaded.model.training


def test_half_precision_save_loads_as_float32(saved, tmp_path):
    _, model, vocab = saved
    path = save_checkpoint(tmp_path / "half.safetensors", model, vocab, ENCODER, dtype=torch.float16)
    loaded = load_checkpoint(path)
    assert loaded.model.embed.weight.dtype == torch.float32
    assert torch.allclose(loaded.model.embed.weight, model.embed.weight, atol=1e-2)


def test_truncated_file(saved):
    path = saved[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)


@pytest.mark.parametrize("seed", range(8))
def test_garbage_file(tmp_path, seed):
    path = tmp_path / "model.safetensors"
    path.write_bytes(random.Random(seed).randbytes(64))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)


def test_garbage_that_starts_like_a_pickle_opcode_is_called_corrupted(tmp_path):
    # 0x80 alone is not a pickle header; only 0x80 followed by a protocol number 2..5 is
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x80\xff" + bytes(62))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors")


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_pickle_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"weights": _Boom()}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned-by-pickle").exists()
    torch_path = tmp_path / "torch.pt"
    torch.save({"a": torch.zeros(2)}, torch_path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(torch_path)


def test_newer_format_version(saved):
    path = saved[0]
    _rewrite(path, lambda m: m.update(format_version="99"))
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)


def test_config_with_wrong_types(saved):
    path = saved[0]

    def mutate(metadata):
        config = json.loads(metadata["config"])
        config["hidden_dim"] = "twelve"
        metadata["config"] = json.dumps(config)

    _rewrite(path, mutate)
    with pytest.raises(CheckpointError, match="hidden_dim"):
        load_checkpoint(path)


def test_vocabulary_size_disagrees_with_weights(saved):
    path = saved[0]

    def mutate(metadata):
        words = json.loads(metadata["vocab"])["words"] + ["extra"]
        metadata["vocab"] = json.dumps({"words": words})
        config = json.loads(metadata["config"])
        config["vocab_size"] = len(words)
        metadata["config"] = json.dumps(config)

    _rewrite(path, mutate)
    with pytest.raises(CheckpointError, match="embedding has"):
        load_checkpoint(path)


def test_missing_weight(saved):
    path = saved[0]
    _rewrite(path, mutate_tensors=lambda t: t.pop("model.output.bias"))
    with pytest.raises(CheckpointError, match="output.bias"):
        load_checkpoint(path)


def test_missing_metadata_entry(saved):
    path = saved[0]
    _rewrite(path, lambda m: m.pop("vocab"))
    with pytest.raises(CheckpointError, match="'vocab'"):
        load_checkpoint(path)


def _info_line(capsys, path) -> str:
    """`captioner info PATH` refused: its one stderr line."""
    from captioner.apps.cli import main

    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_file_and_the_tensor(saved, value, capsys):
    """They caption every photo "in <unk> <unk> ... a" with exit 0 otherwise."""
    path = saved[0]

    def poison(tensors):
        tensors["model.lstm.weight_hh_l0"][0, :3] = value

    _rewrite(path, mutate_tensors=poison)
    assert _info_line(capsys, path) == (
        f"captioner info: error: {path}: model.lstm.weight_hh_l0 holds 3 of {12 * 4 * 12} values that are NaN or "
        "infinite; the file is damaged or its training diverged: use another checkpoint (an earlier epoch, or "
        "retrain)")


@pytest.mark.parametrize("field, value, message", [
    ("num_layers", 0, "num_layers must be a whole number of at least 1, got 0"),
    ("hidden_dim", -4, "hidden_dim must be a whole number of at least 1, got -4"),
    ("dropout", 1.5, "dropout must be a rate in [0, 1), got 1.5"),
    ("image_input", "sometimes", "image_input must be 'every' or 'first', got 'sometimes'"),
])
def test_an_impossible_config_names_the_file(saved, field, value, message, capsys):
    path = saved[0]

    def mutate(metadata):
        metadata["config"] = json.dumps({**json.loads(metadata["config"]), field: value})

    _rewrite(path, mutate)
    assert _info_line(capsys, path) == (f"captioner info: error: {path}: invalid config or vocabulary: {message}; the "
                                        "file is damaged: use another checkpoint")


@pytest.mark.parametrize("entry, message", [
    ({"preprocessing": {"input_size": 0}}, "encoder preprocessing: input_size must be a positive whole number of "
                                           "pixels, found 0"),
    ({"preprocessing": {"input_size": "big"}}, "encoder preprocessing: input_size must be a positive whole number "
                                               "of pixels, found 'big'"),
    ({"preprocessing": {"std_0_255": [1, 0, 1]}}, "std_0_255 must be three positive numbers, found [1, 0, 1]"),
    ({"preprocessing": "squash"}, "'preprocessing' must be a JSON object, found 'squash'"),
    ({"feature_dim": 1280}, "the encoder entry gives 1280-dim features but the decoder takes 16"),
    ({"encoder": ""}, "encoder entry: encoder must be an encoder name, found ''"),
])
def test_an_impossible_encoder_entry_names_the_file(saved, entry, message, capsys):
    """An input size of 0 or "big" used to be ignored silently."""
    path = saved[0]
    _rewrite(path, lambda m: m.update(encoder=json.dumps({**json.loads(m["encoder"]), **entry})))
    err = _info_line(capsys, path)
    assert err.startswith(f"captioner info: error: {path}: ") and message in err, err
    assert err.endswith("use another checkpoint")


def test_a_preprocessing_other_than_the_encoders_is_refused_before_the_cnn_is_built(saved):
    from captioner.encoders import checkpoint_encoder, get_encoder_spec

    path = saved[0]
    own = get_encoder_spec("efficientnet_lite0").preprocessing()
    _rewrite(path, lambda m: m.update(encoder=json.dumps({"encoder": "efficientnet_lite0",
                                                          "preprocessing": {**own, "input_size": 320}})))
    checkpoint = load_checkpoint(path)  # a valid entry: the decoder loads
    with pytest.raises(ValueError, match=rf"{path}: trained on images prepared with input_size 320 \(the "
                                         r"encoder's: 224\), which efficientnet_lite0 does not do"):
        checkpoint_encoder(checkpoint.encoder, str(checkpoint.path))


def test_a_run_folder_is_a_checkpoint_by_its_best(saved, tmp_path, capsys):
    path, model, vocab = saved
    run = tmp_path / "run"
    save_checkpoint(run / "best.safetensors", model, vocab, ENCODER, {"epoch": 3})
    save_checkpoint(run / "last.safetensors", model, vocab, ENCODER, {"epoch": 4})
    assert load_checkpoint(run).info == {"epoch": 3} and load_checkpoint(run).path == run / "best.safetensors"
    assert load_checkpoint(path.parent).path == path  # a folder with model.safetensors: that file
    (tmp_path / "empty").mkdir()
    assert _info_line(capsys, tmp_path / "empty") == (
        f"captioner info: error: {tmp_path / 'empty'}: a folder without model.safetensors or best.safetensors; name "
        "a checkpoint file, a folder holding one of those, or a training run's folder (the --out of `captioner "
        "train`)")
    assert save_checkpoint(tmp_path / "empty", model, vocab, ENCODER) == tmp_path / "empty" / "model.safetensors"


def test_no_machine_paths_are_stored_and_old_ones_still_load(saved, tmp_path):
    from captioner.checkpoint import portable_info, portable_path

    path, model, vocab = saved
    assert portable_path("/home/me/runs/xe/best.safetensors") == "xe/best.safetensors"
    assert portable_path("C:\\Users\\me\\runs\\xe") == "runs/xe" and portable_path("runs/xe/") == "runs/xe"
    info = {"exported_from": "/work/exp/warm-a/best.safetensors", "init_info": {"out": "~/runs/ft"},
            "data": "flickr8k/dataset_flickr8k.json", "list": ["/abs/a/b.json", "relative/c"], "seed": 3}
    assert portable_info(info) == {"exported_from": "warm-a/best.safetensors", "init_info": {"out": "runs/ft"},
                                   "data": "flickr8k/dataset_flickr8k.json", "list": ["a/b.json", "relative/c"],
                                   "seed": 3}
    new = save_checkpoint(tmp_path / "new.safetensors", model, vocab, ENCODER, info)
    assert load_checkpoint(new).info == portable_info(info)
    _rewrite(path, lambda m: m.update(info=json.dumps(info)))  # written before: loads as it is
    assert load_checkpoint(path).info == info


def test_export_refuses_an_existing_target_and_records_no_machine_path(saved, tmp_path, capsys):
    from helpers import load_script

    export = load_script("export_checkpoint.py")
    path = saved[0]
    run = tmp_path / "abs" / "run"
    save_checkpoint(run / "best.safetensors", saved[1], saved[2], ENCODER, {"seed": 3})
    target = tmp_path / "shipped.safetensors"
    export.main([str(run), str(target)])  # a run folder: its best
    assert load_checkpoint(target).info == {"seed": 3, "exported_from": "run/best.safetensors"}
    before = target.read_bytes()
    with pytest.raises(SystemExit) as stopped:
        export.main([str(path), str(target)])
    assert stopped.value.code == 2 and target.read_bytes() == before
    assert f"{target}: a file is already there; replace it with --overwrite" in capsys.readouterr().err
    export.main([str(path), str(target), "--overwrite"])
    assert load_checkpoint(target).info["exported_from"] == f"{path.parent.name}/model.safetensors"


def test_failed_save_keeps_previous_checkpoint(saved, monkeypatch):
    path, model, vocab = saved
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("captioner.checkpoint.save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, vocab, ENCODER)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic saves go through a 0o600 temp file; the result must be as readable as a plainly written file."""
    import stat

    from captioner.utils import write_text_atomic

    vocab = Vocabulary.build([["a", "dog"]], min_count=1)
    model = CaptionDecoder(ModelConfig(vocab_size=len(vocab), feature_dim=4, embed_dim=4, hidden_dim=4, image_dim=4))
    old = os.umask(0o022)
    try:
        checkpoint = save_checkpoint(tmp_path / "model.safetensors", model, vocab, ENCODER)
        write_text_atomic(tmp_path / "log.jsonl", "{}\n")
    finally:
        os.umask(old)
    for path in (checkpoint, tmp_path / "log.jsonl"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


# ------------------------------------------------------------------ finding the checkpoint to use by default
@pytest.fixture
def shipped_places(tmp_path, monkeypatch):
    """Point the packaged and the repository locations at empty temporary folders."""
    import captioner.checkpoint as checkpoint_module

    packaged, repository = tmp_path / "site" / "flickr8k-lite0", tmp_path / "repo" / "flickr8k-lite0"
    monkeypatch.setattr(checkpoint_module, "PACKAGED_CHECKPOINT", packaged)
    monkeypatch.setattr(checkpoint_module, "REPOSITORY_CHECKPOINT", repository)
    monkeypatch.delenv("CAPTIONER_CHECKPOINT", raising=False)
    return packaged, repository


def _put_model(folder):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")


def test_default_checkpoint_prefers_the_environment_then_the_package_then_the_checkout(shipped_places, monkeypatch):
    from captioner.checkpoint import default_checkpoint_path

    packaged, repository = shipped_places
    with pytest.raises(CheckpointError, match="not installed") as error:
        default_checkpoint_path()
    assert str(packaged) in str(error.value) and str(repository) in str(error.value)
    assert "--checkpoint" in str(error.value) and "$CAPTIONER_CHECKPOINT" in str(error.value)
    _put_model(repository)
    assert default_checkpoint_path() == repository  # a git checkout (editable install)
    _put_model(packaged)
    assert default_checkpoint_path() == packaged  # an installed wheel or sdist
    monkeypatch.setenv("CAPTIONER_CHECKPOINT", "/somewhere/else.safetensors")
    assert str(default_checkpoint_path()) == "/somewhere/else.safetensors"


def test_the_shipped_checkpoint_is_found_from_another_working_directory(tmp_path, monkeypatch):
    from captioner.checkpoint import MODEL_FILE, REPOSITORY_CHECKPOINT, default_checkpoint_path

    if not (REPOSITORY_CHECKPOINT / MODEL_FILE).is_file():
        pytest.skip("the shipped checkpoint is not in this checkout")
    monkeypatch.delenv("CAPTIONER_CHECKPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert (default_checkpoint_path() / MODEL_FILE).is_file()


def test_checkpoint_option_beats_the_environment(shipped_places, tmp_path, monkeypatch, capsys):
    from captioner.apps.cli import main

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"not used")
    monkeypatch.setenv("CAPTIONER_CHECKPOINT", str(tmp_path / "from-env.safetensors"))
    assert main(["caption", str(photo), "--checkpoint", str(tmp_path / "from-option.safetensors")]) == 2
    assert "from-option.safetensors: no such checkpoint file" in capsys.readouterr().err
    assert main(["caption", str(photo)]) == 2
    assert "from-env.safetensors: no such checkpoint file" in capsys.readouterr().err
    monkeypatch.delenv("CAPTIONER_CHECKPOINT")
    assert main(["caption", str(photo)]) == 2  # nothing installed: says where it looked and what to do
    assert "shipped checkpoint is not installed" in capsys.readouterr().err
