"""The command line's own promises: --help shows every option's default, an error names only options the
command has, `captioner info` is a short summary (--json the rest), training and evaluation read the
references by one rule, and a run's checkpoints hold no machine paths. Synthetic data (no photos, no CNN)."""

from __future__ import annotations

import argparse
import json
import re

import pytest
from helpers import synthetic_training_data, train_argv

from captioner.apps.cli import build_parser, main
from captioner.apps.training import TRAIN_SPLIT_ADVICE
from captioner.checkpoint import load_checkpoint, read_raw

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def options_of(command: str) -> set[str]:
    return {option for action in commands()[command]._actions for option in action.option_strings}


def test_help_shows_every_options_default():
    missing = []
    for name, parser in commands().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.required:
                continue  # positionals, switches (off unless given), required options
            text = formatter._expand_help(action) if action.help else ""
            if "default" not in text.lower():
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, f"options whose --help does not say their default: {missing}"
    help_text = "".join(parser.format_help() for parser in commands().values())
    assert "(default: 0.5)" in commands()["caption"].format_help()  # the length penalty, invisible before
    assert "Flickr8k checkpoint" not in help_text and "Flickr8k model" not in help_text
    assert "the shipped checkpoint" in commands()["caption"].format_help()


def test_errors_name_only_options_the_command_has(tmp_path, capsys):
    """coco-dev's captions.json (no split in its name: all test) made train advise `use --split test`."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").touch()
    (tmp_path / "captions.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}]}))
    data = ["--data", str(tmp_path)]
    refusals = {
        "train": ["train", *data, "--features", "f", "--out", str(tmp_path / "run")],
        "memory": ["memory", *data, "--out", str(tmp_path / "m.safetensors")],
        "evaluate": ["evaluate", *data, "--split", "val", "--checkpoint", "/nonexistent.safetensors"],
    }
    for command, argv in refusals.items():
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "no 'train' images" in err or "no 'val' images" in err, err
        named = set(re.findall(r"--[a-z][a-z-]+", err))
        assert named and named <= options_of(command), (command, named - options_of(command), err)
        assert ("--split" in named) == (command != "train")
    assert "--karpathy-split FILE" in TRAIN_SPLIT_ADVICE


def test_a_bad_shape_flag_is_named(tmp_path, capsys):
    assert main(["train", "--data", "d", "--features", "f", "--out", str(tmp_path), "--layers", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("captioner train: error: --layers 0: must be a whole number of at "
                                               "least 1, got 0")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic dataset whose train split has a punctuation-only caption and whose test split a 10,000-word
    one, and a 2-epoch run over it (with --skip-invalid)."""
    folder = tmp_path_factory.mktemp("doors")
    data = synthetic_training_data(folder / "data")
    content = json.loads(data["data"].read_text())
    content["images"][0]["sentences"][1]["raw"] = "..."
    test_image = next(i for i, entry in enumerate(content["images"]) if entry["split"] == "test")
    content["images"][test_image]["sentences"][2]["raw"] = " ".join(["dog"] * 10_000)
    data["data"].write_text(json.dumps(content))
    data["bad"] = ["images[0] (imgid 0, 'train0.jpg'): sentences[1]: caption '...' has no words",
                   f"images[{test_image}] (imgid {test_image}, 'test0.jpg'): sentences[2]: caption 'dog dog"]
    return data


@pytest.mark.slow
def test_train_and_evaluate_read_the_references_by_one_rule(trained, tmp_path, capsys):
    """A punctuation-only caption was dropped by train but scored as an empty reference by evaluate: now both
    refuse the same entries, and with --skip-invalid both leave them out with the same warning naming them."""
    run = tmp_path / "run"
    assert main(train_argv(trained, run)) == 2
    assert trained["bad"][0] in capsys.readouterr().err
    assert main(train_argv(trained, run, "--skip-invalid")) == 0
    train_err = capsys.readouterr().err
    evaluate = ["evaluate", "--checkpoint", str(run), "--data", str(trained["data"]), "--features",
                str(trained["features"]), "--concepts", "off"]
    assert main(evaluate) == 2
    assert trained["bad"][0] in capsys.readouterr().err  # the first problem of the file, as train said
    assert main([*evaluate, "--skip-invalid"]) == 0
    evaluate_err = capsys.readouterr().err
    for err in (train_err, evaluate_err):
        assert "2 invalid entries skipped:" in err and all(bad in err for bad in trained["bad"]), err
    summary = [line for line in train_err.splitlines() if "skipped" in line or line.startswith("  ")]
    assert summary == [line for line in evaluate_err.splitlines() if "skipped" in line or line.startswith("  ")]


@pytest.mark.slow
def test_info_is_a_short_summary_and_json_has_the_rest(trained, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(trained, run, "--skip-invalid", "--seed", "5")) == 0
    best = load_checkpoint(run)
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(run / "best.safetensors") and len(lines) <= 10
    val = best.info["val_metrics"]
    assert any(line.startswith(f"  val       BLEU-4 {val['BLEU-4'] * 100:.1f}  CIDEr-D {val['CIDEr-D'] * 100:.1f}  "
                               f"(beam 1, length penalty 0.5, epoch {best.info['epoch']})") for line in lines)  # x100
    trained_line = next(line for line in lines if line.startswith("  trained"))
    assert f"cross-entropy, epoch {best.info['epoch']} of 2, on data/dataset_synthetic.json (24 images, " \
           "71 captions), seed 5" in trained_line
    assert any(line.startswith("  decoding  beam 3, length penalty 0.5") for line in lines)
    assert main(["info", str(run), "--json"]) == 0
    everything = json.loads(capsys.readouterr().out)
    assert everything["info"]["train_config"]["seed"] == 5 and everything["config"]["hidden_dim"] == 8


@pytest.mark.slow
def test_a_runs_checkpoints_hold_no_machine_paths(trained, tmp_path):
    """Absolute paths everywhere on the command line; the checkpoints name files by folder and name only."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(train_argv(trained, first, "--skip-invalid", epochs=1)) == 0
    assert main(train_argv(trained, second, "--skip-invalid", "--init-from", str(first), epochs=1, dim=None)) == 0
    for path in (first / "best.safetensors", second / "best.safetensors", second / "last.safetensors"):
        _, metadata = read_raw(path)
        assert str(tmp_path) not in json.dumps(metadata), path
    info = load_checkpoint(second).info
    assert info["init_checkpoint"] == "first/best.safetensors" and info["data"] == "data/dataset_synthetic.json"
    assert main(train_argv(trained, second, "--skip-invalid", "--init-from", str(first), "--resume", epochs=1,
                           dim=None)) == 0  # the recorded init names the same file


def test_an_error_naming_a_hostile_file_stays_one_plain_line(tmp_path, capsys):
    name = tmp_path / "bad\x1b[31mname\nsecond line.safetensors"
    assert main(["info", str(name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "bad\\x1b[31mname\\nsecond line" in err
