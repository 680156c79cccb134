"""`captioner caption`: good files get captions, bad files error rows, exit status, resume."""

import csv
import json
import shutil

import pytest
from helpers import REPO_ROOT

from captioner.apps.cli import main
from captioner.apps.inputs import expand_inputs
from captioner.apps.outputs import ResultWriter


@pytest.fixture
def mixed_folder(tmp_path, flickr8k_dir):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    names = sorted(p.name for p in (flickr8k_dir / "images").iterdir())[:5]
    shutil.copy(flickr8k_dir / "images" / names[0], folder / "one dog.jpg")
    shutil.copy(flickr8k_dir / "images" / names[1], folder / "ünïcode.jpg")
    shutil.copy(flickr8k_dir / "images" / names[2], folder / "nested" / "deep.jpg")
    (folder / "notes.jpg").write_text("this is not an image")
    (folder / "empty.png").write_bytes(b"")
    data = (flickr8k_dir / "images" / names[3]).read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "readme.txt").write_text("ignored: not an image extension")
    (folder / "nested" / "loop").symlink_to(folder, target_is_directory=True)
    return folder


def test_expand_inputs_folders_globs_and_missing(mixed_folder):
    flat, problems = expand_inputs([str(mixed_folder)])
    assert {p.rsplit("/", 1)[1] for p in flat} == {"one dog.jpg", "ünïcode.jpg", "notes.jpg", "empty.png",
                                                   "truncated.jpg"}
    deep, _ = expand_inputs([str(mixed_folder)], recursive=True)
    assert any(p.endswith("nested/deep.jpg") for p in deep) and len(deep) == 6  # the symlink loop is not followed
    globbed, problems = expand_inputs([str(mixed_folder / "*.png"), str(mixed_folder / "missing.jpg")])
    assert [p.rsplit("/", 1)[1] for p in globbed] == ["empty.png"]
    assert problems == [(str(mixed_folder / "missing.jpg"), "no such file or folder")]


@pytest.mark.slow
@pytest.mark.shared_data
def test_caption_folder_with_broken_files(tiny_run, mixed_folder, tmp_path, capsys):
    output = tmp_path / "results.jsonl"
    status = main(["caption", str(mixed_folder), "--recursive", "--checkpoint", str(tiny_run["checkpoint"]),
                   "--output", str(output), "--batch-size", "2"])
    assert status == 1
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    by_name = {row["image"].rsplit("/", 1)[1]: row for row in rows}
    assert len(rows) == 6
    for good in ("one dog.jpg", "ünïcode.jpg", "deep.jpg"):
        assert by_name[good]["caption"] and by_name[good]["error"] is None
    for bad in ("notes.jpg", "empty.png", "truncated.jpg"):
        assert by_name[bad]["caption"] is None and by_name[bad]["error"]
    err = capsys.readouterr().err
    assert "notes.jpg" in err and "3 failed" in err

    # nothing is overwritten without --resume
    assert main(["caption", str(mixed_folder), "--checkpoint", str(tiny_run["checkpoint"]),
                 "--output", str(output)]) == 2
    # --resume keeps every captioned row, tries the failed images again, and finishes a file cut mid-line
    text = output.read_text()
    output.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + '{"image": "half')
    assert main(["caption", str(mixed_folder), "--recursive", "--checkpoint", str(tiny_run["checkpoint"]),
                 "--output", str(output), "--resume"]) == 1
    resumed = [json.loads(line) for line in output.read_text().splitlines()]
    captioned = [row for row in rows[:5] if row["error"] is None]
    assert resumed[:len(captioned)] == captioned and len(resumed) == 6
    assert sorted(r["image"] for r in resumed) == sorted(r["image"] for r in rows)
    assert [r for r in resumed if r["error"]] == [r for r in rows if r["error"]]  # the same reasons again


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_other_output_formats(tiny_run, mixed_folder, tmp_path, suffix):
    output = tmp_path / f"results{suffix}"
    status = main(["caption", str(mixed_folder / "one dog.jpg"), str(mixed_folder / "notes.jpg"), "--checkpoint",
                   str(tiny_run["checkpoint"]), "--output", str(output), "--n-best", "2"])
    assert status == 1
    if suffix == ".csv":
        rows = list(csv.DictReader(output.open()))
        assert [r["rank"] for r in rows if r["image"].endswith("one dog.jpg")] == ["1", "2"]
        assert any(r["error"] for r in rows if r["image"].endswith("notes.jpg"))
    else:
        rows = json.loads(output.read_text())
        assert len(rows) == 2 and len(rows[0]["captions"]) == 2


@pytest.mark.slow
@pytest.mark.shared_data
def test_all_good_exits_zero_and_prints(tiny_run, mixed_folder, capsys):
    assert main(["caption", str(mixed_folder / "one dog.jpg"), "--checkpoint", str(tiny_run["checkpoint"]),
                 "--strategy", "greedy"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(mixed_folder / "one dog.jpg")) and len(line.split("\t")[1]) > 0


def test_result_writer_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match=".jsonl, .csv or .json"):
        ResultWriter(tmp_path / "out.txt", resume=False)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_group_of_rows_is_one_write_call(tmp_path, monkeypatch, suffix):
    """A kill can interrupt between system calls, not inside one: with the whole group in one write, an
    image's n-best CSV rows are never left half-written."""
    import os

    from captioner.apps.outputs import result_row
    from captioner.decoding import Caption

    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    captions = [Caption(f"caption {k} with a comma, and \"quotes\"", -1.0 * k, -0.5 * k, True) for k in range(3)]
    rows = [result_row(f"image{i}.jpg", captions) for i in range(200)] + [result_row("bad.jpg", error="not an image")]
    writer = ResultWriter(tmp_path / f"out{suffix}", resume=False)
    writer.write(rows)
    writer.write(rows[:2])
    assert len(writes) == 2 and writes[0] > 8192  # bigger than a buffered writer's chunk
    if suffix == ".csv":
        with open(tmp_path / "out.csv", newline="") as handle:
            table = list(csv.DictReader(handle))
        assert len(table) == 3 * 202 + 1 and table[0]["caption"] == captions[0].text
    again = ResultWriter(tmp_path / f"out{suffix}", resume=True)  # done: the captioned; bad.jpg is tried again
    assert again.done == {row["image"] for row in rows[:-1]} and again.retried == 1


@pytest.mark.slow
@pytest.mark.shared_data
def test_decoding_in_groups_changes_nothing_but_when_rows_are_written(tiny_run, mixed_folder, tmp_path):
    """The same rows, in input order, whether features are decoded per CNN batch or in groups of batches
    (a group here spans good and broken files of several batches)."""
    outputs = []
    for decode_batch_size in (1, 3, 128):
        output = tmp_path / f"grouped{decode_batch_size}.jsonl"
        assert main(["caption", str(mixed_folder), "--recursive", "--checkpoint", str(tiny_run["checkpoint"]),
                     "--output", str(output), "--batch-size", "2", "--decode-batch-size", str(decode_batch_size),
                     "--strategy", "beam", "--beam-size", "3", "--n-best", "2"]) == 1
        outputs.append(output.read_text())
    assert outputs[0] == outputs[1] == outputs[2]
    rows = [json.loads(line) for line in outputs[0].splitlines()]
    assert len(rows) == 6 and sum(row["error"] is None for row in rows) == 3


# --------------------------------------------------------------------------------------------- concepts
def _concept_args(*flags: str):
    from captioner.apps.cli import build_parser
    from captioner.apps.commands import decode_config

    return decode_config(build_parser().parse_args(["caption", "photo.jpg", *flags]))


def test_concept_flags_map_to_the_decode_config():
    from captioner.config import DecodeConfig

    assert _concept_args().concept_threshold == DecodeConfig().concept_threshold
    assert _concept_args("--concepts", "off").concept_threshold is None
    config = _concept_args("--concept-threshold", "0.55", "--max-constraints", "1")
    assert (config.concept_threshold, config.max_constraints) == (0.55, 1)
    with pytest.raises(ValueError, match="does not go with --concepts off"):
        _concept_args("--concepts", "off", "--concept-threshold", "0.5")
    with pytest.raises(ValueError, match="max_constraints"):
        _concept_args("--max-constraints", "3")


@pytest.mark.slow
def test_caption_rows_carry_the_concepts_unless_off(toy_checkpoint, tmp_path, capsys, one_torch_thread):
    cat = REPO_ROOT / "demo" / "examples" / "cat.jpg"
    rows = {}
    for concepts in ("on", "off"):
        output = tmp_path / f"concepts-{concepts}.jsonl"
        assert main(["caption", str(cat), "--checkpoint", str(toy_checkpoint), "--output", str(output),
                     "--n-best", "2", "--concepts", concepts]) == 0
        rows[concepts] = json.loads(output.read_text())
    assert [c["word"] for c in rows["on"]["concepts"]] == ["cat"]
    p = rows["on"]["concepts"][0]["p"]
    assert 0.3 <= p <= 1 and p == round(p, 3)
    assert all("cat" in c["text"].split() and c["constraints_met"] is True for c in rows["on"]["captions"])
    assert rows["off"]["concepts"] == [] and all("constraints_met" not in c for c in rows["off"]["captions"])
    assert rows["off"]["caption"] != rows["on"]["caption"]
    # CSV keeps its columns
    output = tmp_path / "concepts.csv"
    assert main(["caption", str(cat), "--checkpoint", str(toy_checkpoint), "--output", str(output)]) == 0
    assert list(csv.DictReader(output.open()))[0]["caption"] == rows["on"]["caption"]
    assert main(["caption", str(cat), "--checkpoint", str(toy_checkpoint), "--concepts", "off",
                 "--concept-threshold", "0.4"]) == 2
    assert "does not go with --concepts off" in capsys.readouterr().err
