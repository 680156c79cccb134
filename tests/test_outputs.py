"""The results file of `captioner caption --output` under faults: resume counts each input once and tries
again what failed; a cut or corrupt file, a read-only or full disk, a folder as output, hostile file names
and spreadsheet formulas each end in one line naming the file, the problem and the fix, and lose nothing.

The model is helpers.FakeCaptioner (conftest's `fake_captioner`): these test the door's bookkeeping, not
captions."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from captioner.apps.cli import main
from captioner.apps.outputs import CSV_FIELDS, OutputError, ResultWriter, csv_cell, result_row


def photo(path: Path, content: bytes = b"photo") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return str(path)


def jsonl_rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in output.read_text(encoding="utf-8", errors="surrogateescape").split("\n")
            if line]


def csv_table(output: Path) -> list[dict]:
    with open(output, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        return list(csv.DictReader(handle))


def one_error_line(err: str) -> str:
    """The single line a usage/setup error prints (no traceback, nothing else)."""
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("captioner caption: error: "), err
    return lines[0].removeprefix("captioner caption: error: ")


# ------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_input_problems_are_not_appended_again_on_every_resume(tmp_path, fake_captioner, capsys, suffix):
    image = photo(tmp_path / "img.jpg")
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    output = tmp_path / f"g{suffix}"
    args = ["caption", image, str(tmp_path / "nope.jpg"), str(pipe), "-o", str(output)]
    assert main(args) == 1
    for _ in range(2):
        assert main([*args, "--resume"]) == 1
    if suffix == ".jsonl":
        images = [row["image"] for row in jsonl_rows(output)]
    elif suffix == ".csv":
        images = [row["image"] for row in csv_table(output)]
    else:
        images = [row["image"] for row in json.loads(output.read_text())]
    assert sorted(images) == sorted([image, str(tmp_path / "nope.jpg"), str(pipe)])  # 3 rows for 3 inputs
    assert fake_captioner.seen == [image]  # captioned once; the two inputs that give no image never opened
    err = capsys.readouterr().err
    assert "resuming: 1 images already in" in err and "trying again the 2 that failed" in err


def test_a_fixed_photo_is_tried_again_on_resume(tmp_path, fake_captioner, capsys):
    good, broken = photo(tmp_path / "x.jpg"), photo(tmp_path / "y.jpg", b"broken")
    output = tmp_path / "g.jsonl"
    assert main(["caption", good, broken, "-o", str(output)]) == 1
    first = output.read_text()
    photo(tmp_path / "y.jpg")  # the user replaces the broken file with a good photo
    assert main(["caption", good, broken, "-o", str(output), "--resume"]) == 0
    rows = jsonl_rows(output)
    assert [(row["image"], row["caption"], row["error"]) for row in rows] == [
        (good, "a photo of x", None), (broken, "a photo of y", None)]
    assert output.read_text().startswith(first.split("\n")[0] + "\n")  # the captioned row kept byte for byte
    err = capsys.readouterr().err
    assert "resuming: 1 images already in" in err and "trying again the 1 that failed" in err
    assert err.rstrip().endswith(f"captioned 1 of 1 images (1 more were done before); results in {output}")
    # nothing left: the run says so and exits 0
    assert main(["caption", good, broken, "-o", str(output), "--resume"]) == 0
    assert f"nothing left to caption: all 2 images were done before; results in {output}" in capsys.readouterr().err


def test_csv_cut_inside_a_quoted_file_name_is_repaired_without_a_duplicate(tmp_path, fake_captioner):
    """A file name holding a line break is a quoted CSV cell spanning two lines; a write cut right after that
    line break ends the file with \\n inside the cell. The repair drops that whole record."""
    names = [photo(tmp_path / f"p{i:02d}.jpg") for i in range(14)] + [photo(tmp_path / "new\nline.jpg")]
    output = tmp_path / "g.csv"
    assert main(["caption", *names, "-o", str(output), "--decode-batch-size", "1"]) == 0
    data = output.read_bytes()
    cut = data.index(b"new\n") + len(b"new\n")  # inside the quoted cell of the last record
    output.write_bytes(data[:cut])
    for _ in range(2):
        assert main(["caption", *names, "-o", str(output), "--resume"]) == 0
        table = csv_table(output)
        assert sorted(row["image"] for row in table) == sorted(names)  # 15 rows for 15 images, every time
    assert output.read_bytes() == data


@pytest.mark.parametrize("suffix, content, message", [
    (".jsonl", '{"image": "a.jpg", "caption": "x", "error": null}\n{"image": "b.jpg"}\n{"image": "c.jpg", "cap\n'
               '{"image": "d.jpg", "error": null}\n',
     "--output {out}, line 3: not a JSON row (Unterminated string starting at: column 20); repair or delete that line, "
     "or choose another --output (or --overwrite to replace the file)"),
    (".jsonl", '{"image": "a.jpg", "error": null}\n{"caption": "no image", "error": null}\n',
     "--output {out}, line 2: a row without \"image\", not a result row of `captioner caption`; repair or delete that "
     "line, or choose another --output (or --overwrite to replace the file)"),
    (".json", '[{"image": "a.jpg", "caption": "unterminated]',
     "--output {out}: not valid JSON (Unterminated string starting at: line 1 column 32); repair it, or choose another "
     "--output (or --overwrite to replace the file)"),
    (".json", '[{"image": "a.jpg"}, {"caption": "x"}]',
     "--output {out}, row 2: a row without \"image\", not a result row of `captioner caption`; repair it, or choose "
     "another --output (or --overwrite to replace the file)"),
    (".json", '{"image": "a.jpg"}',
     "--output {out}: not a list of result rows; repair it, or choose another --output (or --overwrite to replace "
     "the file)"),
    (".csv", "name,caption\r\na.jpg,x\r\n",
     "--output {out}: its first line is not the results header image,rank,caption,log_prob,score,error, so it is "
     "not a results file of `captioner caption`; repair or delete that line, or choose another --output (or "
     "--overwrite to replace the file)"),
    (".csv", "image,rank,caption,log_prob,score,error\r\na.jpg,1,x,-1,-1,\r\n,1,y,-1,-1,\r\n",
     "--output {out}, line 3: a row without an image and 6 cells; repair or delete that line, or choose another "
     "--output (or --overwrite to replace the file)"),
])
def test_a_corrupt_output_names_the_file_and_the_line(tmp_path, fake_captioner, capsys, suffix, content, message):
    output = tmp_path / f"results{suffix}"
    output.write_bytes(content.encode())
    assert main(["caption", photo(tmp_path / "a.jpg"), "-o", str(output), "--resume"]) == 2
    assert one_error_line(capsys.readouterr().err) == message.format(out=output)
    assert output.read_bytes() == content.encode()  # left as it was
    # --overwrite replaces it
    assert main(["caption", photo(tmp_path / "a.jpg"), "-o", str(output), "--overwrite"]) == 0


# ------------------------------------------------------------------------------------------- overwrite
@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_overwrite_replaces_and_nothing_is_replaced_without_it(tmp_path, fake_captioner, capsys, suffix):
    output = tmp_path / f"g{suffix}"
    assert main(["caption", photo(tmp_path / "old.jpg"), "-o", str(output)]) == 0
    before = output.read_bytes()
    capsys.readouterr()
    assert main(["caption", photo(tmp_path / "new.jpg"), "-o", str(output)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"--output {output} already exists: pass --resume to continue it, --overwrite to replace it, or choose "
        "another name (nothing is overwritten)")
    assert main(["caption", str(tmp_path / "new.jpg"), "-o", str(output), "--overwrite", "--resume"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "--resume continues the output file and --overwrite replaces it: give one of them")
    assert output.read_bytes() == before
    assert main(["caption", str(tmp_path / "new.jpg"), "-o", str(output), "--overwrite"]) == 0
    text = output.read_text()
    assert "new.jpg" in text and "old.jpg" not in text
    if suffix == ".csv":
        assert text.count("image,rank,caption") == 1


def test_overwrite_keeps_the_old_file_until_results_are_ready(tmp_path, fake_captioner, monkeypatch):
    output = tmp_path / "g.jsonl"
    assert main(["caption", photo(tmp_path / "old.jpg"), "-o", str(output)]) == 0
    before = output.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(fake_captioner, "stream", interrupted)
    assert main(["caption", photo(tmp_path / "new.jpg"), "-o", str(output), "--overwrite"]) == 130
    assert output.read_bytes() == before


# ------------------------------------------------------------------------------ spreadsheets and terminals
HOSTILE = ['=HYPERLINK("evil.example","y")', "=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "'quoted",
           "plain"]


def test_csv_cells_are_escaped_against_formula_injection(tmp_path, fake_captioner, monkeypatch):
    fake_captioner.caption_prefix = ""  # the caption is the file's name without .jpg: hostile too
    for name in HOSTILE:
        photo(tmp_path / f"{name}.jpg")
    monkeypatch.chdir(tmp_path)  # relative paths, so that the image cell starts with the name
    relative = [f"{name}.jpg" for name in HOSTILE]
    output = tmp_path / "g.csv"
    assert main(["caption", "-o", str(output), "--", *relative]) == 0
    table = csv_table(output)
    assert len(table) == len(HOSTILE)
    for row, name in zip(table, HOSTILE, strict=True):
        expected = name if name == "plain" else "'" + name
        assert row["image"] == expected + ".jpg" and row["caption"] == expected
        assert row["log_prob"] == "-1.5000" and row["score"] == "-0.7500"  # numbers stay numbers
    assert csv_cell("a=b") == "a=b" and csv_cell("=b") == "'=b"
    # the escaped names read back as the files they are: nothing is captioned twice
    assert main(["caption", "-o", str(output), "--resume", "--", *relative]) == 0
    assert len(csv_table(output)) == len(HOSTILE) and len(fake_captioner.seen) == len(HOSTILE)


def test_error_lines_escape_line_breaks_and_terminal_sequences(tmp_path, fake_captioner, capsys):
    name = photo(tmp_path / "evil\nerror: fake.jpg\x1b[2J\u202egpj.jpg", b"broken")
    odd = photo(tmp_path / "odd\udcff.jpg", b"broken")
    assert main(["caption", name, odd, "-o", str(tmp_path / "g.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\u202e" not in err and "\udcff" not in err
    lines = err.splitlines()
    assert lines[:2] == [f"error: {tmp_path}/evil\\nerror: fake.jpg\\x1b[2J\\u202egpj.jpg: not an image",
                         f"error: {tmp_path}/odd\\xff.jpg: not an image"]
    assert len(lines) == 3 and lines[2].startswith("captioned 0 of 2 images; 2 failed")
    # without --output, the caption lines on stdout are one per image too
    good = photo(tmp_path / "two\nlines.jpg")
    assert main(["caption", good]) == 0
    assert capsys.readouterr().out == f"{tmp_path}/two\\nlines.jpg\ta photo of two\\nlines\n"


# ----------------------------------------------------------------------------------------- bad places
def test_an_output_that_is_a_folder(tmp_path, fake_captioner, capsys):
    folder = tmp_path / "results.jsonl"
    folder.mkdir()
    for output in (folder, tmp_path):
        assert main(["caption", photo(tmp_path / "a.jpg"), "-o", str(output)]) == 2
        assert one_error_line(capsys.readouterr().err) == (
            f"--output {output} is a folder: name a results file in it, e.g. {output}/results.jsonl")
    assert fake_captioner.seen == []  # refused before any work


def test_an_output_in_a_missing_folder_is_created_with_the_first_results(tmp_path, fake_captioner, capsys):
    output = tmp_path / "new" / "deeper" / "g.jsonl"
    assert main(["caption", photo(tmp_path / "a.jpg"), "-o", str(output)]) == 0
    assert [row["image"] for row in jsonl_rows(output)] == [str(tmp_path / "a.jpg")]
    blocked = tmp_path / "a.jpg" / "g.jsonl"
    capsys.readouterr()
    assert main(["caption", str(tmp_path / "a.jpg"), "-o", str(blocked)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"--output {blocked}: {tmp_path / 'a.jpg'} is a file, not a folder; choose another --output")


def readonly_filesystem(monkeypatch, folder: Path) -> None:
    """Make `folder` behave as on a read-only filesystem for this process (statvfs says so, writes fail with
    EROFS): the case a real read-only mount gives, where the test cannot mount one."""
    real_statvfs, real_open = os.statvfs, os.open

    class ReadOnly:
        def __init__(self, result):
            self.result = result

        def __getattr__(self, name):
            return getattr(self.result, name)

        @property
        def f_flag(self):
            return self.result.f_flag | os.ST_RDONLY

    def statvfs(path):
        result = real_statvfs(path)
        return ReadOnly(result) if Path(path).resolve().is_relative_to(folder) else result

    def open_(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR) and Path(path).resolve().is_relative_to(folder):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "statvfs", statvfs)
    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize("real", [True, False], ids=["tmpfs", "simulated"])
def test_an_output_on_a_read_only_filesystem(tmp_path, fake_captioner, capsys, monkeypatch, tmpfs_mount, real):
    image = photo(tmp_path / "a.jpg")
    if real:
        folder = tmpfs_mount("readonly", read_only=True)
    else:
        folder = tmp_path / "readonly"
        folder.mkdir()
        readonly_filesystem(monkeypatch, folder)
    for output in (folder / "g.jsonl", folder / "sub" / "g.csv"):
        assert main(["caption", image, "-o", str(output)]) == 2
        assert one_error_line(capsys.readouterr().err) == (
            f"--output {output}: {folder} is on a read-only filesystem; choose an --output on a writable disk")
    assert fake_captioner.seen == []
    # a filesystem that turns read-only during the run: the same kind of line when the first group is written
    writer = ResultWriter(tmp_path / "later.jsonl")
    readonly_filesystem(monkeypatch, tmp_path)
    with pytest.raises(OutputError) as caught:
        writer.write([result_row("a.jpg", error="x")])
    assert str(caught.value) == (f"--output {tmp_path / 'later.jsonl'} is on a read-only filesystem; choose an "
                                 "--output on a writable disk")


@pytest.mark.parametrize("real", [True, False], ids=["chmod", "simulated"])
def test_an_output_where_writing_is_not_permitted(tmp_path, fake_captioner, capsys, monkeypatch, real):
    image = photo(tmp_path / "a.jpg")
    folder = tmp_path / "locked"
    folder.mkdir()
    if real:
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):
            folder.chmod(0o755)
            pytest.skip("this process writes whatever the permissions (root); the simulated case covers it")
    else:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == folder else real_access(path, mode))
    try:
        output = folder / "g.jsonl"
        assert main(["caption", image, "-o", str(output)]) == 2
        assert one_error_line(capsys.readouterr().err) == (
            f"--output {output}: permission denied (cannot write to {folder}); choose an --output in a folder you "
            "can write to")
    finally:
        folder.chmod(0o755)
    assert fake_captioner.seen == []


def short_then_full(monkeypatch, after_bytes: int) -> None:
    """os.write as on a disk with `after_bytes` free: a write that would pass it writes what fits, and the next
    raises ENOSPC (Errno 28)."""
    real_write = os.write
    free = [after_bytes]

    def write(descriptor, data):
        if free[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = real_write(descriptor, bytes(data[: free[0]]))
        free[0] -= written
        return written

    monkeypatch.setattr(os, "write", write)


def images_in(output: Path) -> list[str]:
    if output.suffix == ".jsonl":
        return [row["image"] for row in jsonl_rows(output)]
    if output.suffix == ".csv":
        return [row["image"] for row in csv_table(output)]
    return [row["image"] for row in json.loads(output.read_text())]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
@pytest.mark.parametrize("real", [True, False], ids=["tmpfs", "simulated"])
def test_a_full_disk_keeps_the_groups_written_and_resume_finishes(tmp_path, fake_captioner, capsys, monkeypatch,
                                                                  tmpfs_mount, suffix, real):
    if suffix == ".json" and not real:
        pytest.skip(".json is rewritten through a temporary file, whose writes the os.write stand-in does not "
                    "reach; the tmpfs case fills a real disk")
    fake_captioner.caption_prefix = "a long caption that fills the disk quickly " * 4
    names = [photo(tmp_path / "photos" / f"p{i:03d}.jpg") for i in range(120)]
    folder = tmpfs_mount("small", size="12k") if real else tmp_path / "out"
    output = folder / f"g{suffix}"
    real_write = os.write
    if not real:
        short_then_full(monkeypatch, 10_000)
    assert main(["caption", str(tmp_path / "photos"), "-o", str(output), "--decode-batch-size", "7"]) == 2
    message = one_error_line(capsys.readouterr().err)
    kept = int(message.split("; the ")[1].split(" results")[0])
    assert kept > 0 and kept % 7 == 0
    assert message == (f"--output {output}: the disk is full (No space left on device); the {kept} results written "
                       "before are kept: free some space, then rerun with --resume")
    # the file ends after a whole group: every row is complete, none repeated
    data = output.read_bytes()
    assert data.endswith(b"\n") or suffix == ".json"
    assert images_in(output) == names[:kept]
    # space is freed (here: the results move to a disk with room) and the run resumed
    monkeypatch.setattr(os, "write", real_write)
    roomy = tmp_path / f"moved{suffix}"
    roomy.write_bytes(data)
    assert main(["caption", str(tmp_path / "photos"), "-o", str(roomy), "--resume"]) == 0
    assert images_in(roomy) == names
    assert roomy.read_bytes().startswith(data) or suffix == ".json"


# ------------------------------------------------------------------------------------------- interrupt
INTERRUPTIBLE = """
import sys
sys.path.insert(0, {tests!r})
from helpers import FakeCaptioner
from captioner.api import Captioner
from captioner.apps.cli import main

fake = FakeCaptioner(stall_seconds=120)
Captioner.from_pretrained = fake.from_pretrained
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ctrl_c_names_the_exact_resume_rerun(tmp_path):
    """A real SIGINT to a running `captioner caption` (the model stands in); the rerun it prints, run as
    printed, finishes the job with each image once."""
    folder = tmp_path / "my photos"
    photo(folder / "a.jpg")
    photo(folder / "b.jpg", b"stall")  # the run waits here
    photo(folder / "c.jpg")
    output = tmp_path / "out.csv"
    script = INTERRUPTIBLE.format(tests=str(REPO_ROOT / "tests"))
    command = ["caption", str(folder), "--output", str(output), "--decode-batch-size", "1", "--beam-size", "2",
               "--overwrite"]
    output.write_text("an old file, replaced\n")
    process = subprocess.Popen([sys.executable, "-c", script, *command], stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not (output.exists() and output.read_text().count("\n") >= 2):  # the header and a.jpg's row
        assert time.monotonic() < deadline and process.poll() is None, "the run ended or stalled before its first row"
        time.sleep(0.05)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    rerun = shlex.join(["captioner", *[arg for arg in command if arg != "--overwrite"], "--resume"])
    assert last == f"captioner caption: interrupted; continue with: {rerun}"
    typed = shlex.split(last.split("continue with: ")[1])
    assert typed[0] == "captioner"
    finished = subprocess.run([sys.executable, "-c", script.replace("stall_seconds=120", "stall_seconds=0"),
                               *typed[1:]], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert "resuming: 1 images already in" in finished.stderr
    table = list(csv.DictReader(io.StringIO(output.read_text(), newline="")))
    assert [Path(row["image"]).name for row in table] == ["a.jpg", "b.jpg", "c.jpg"]
    assert list(table[0]) == CSV_FIELDS


# ------------------------------------------------------------------------------------ torchrun shares
def test_sharded_resume_retries_errors_of_the_output_and_of_leftover_shares(tmp_path, fake_captioner):
    """The merge of an interrupted run under torchrun, finished by one process (no torchrun start): error rows
    in the output and in a leftover rank file are tried again; each image ends up with one row."""
    from captioner.apps.batch import BatchOptions, caption_paths_sharded, rank_file
    from captioner.config import DecodeConfig
    from captioner.decoding import Caption

    names = [photo(tmp_path / "photos" / f"p{i}.jpg") for i in range(6)]
    output = tmp_path / "out.jsonl"

    def row(name: str, error: str) -> str:
        return json.dumps(result_row(name, error=error)) + "\n"

    output.write_text(row(names[0], "not an image") + json.dumps(result_row(names[1], [Caption("kept", -1, -1, True)]))
                      + "\n")
    rank_file(output, 1).write_text(row(names[2], "not an image") + row(names[3], "not an image"))
    options = BatchOptions(output=output, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="already exists; pass --resume to continue it, --overwrite to replace it"):
        caption_paths_sharded([str(tmp_path / "photos")], fake_captioner, DecodeConfig(), options)
    status = caption_paths_sharded([str(tmp_path / "photos")], fake_captioner, DecodeConfig(),
                                   BatchOptions(output=output, resume=True, batch_size=2, progress=False))
    assert status == 0
    rows = jsonl_rows(output)
    assert sorted(r["image"] for r in rows) == names and all(r["error"] is None for r in rows)
    assert next(r for r in rows if r["image"] == names[1])["caption"] == "kept"
    assert sorted(fake_captioner.seen) == sorted(set(names) - {names[1]})
    assert not rank_file(output, 1).exists()
    # --overwrite: leftover shares are deleted, the output replaced by the merge
    rank_file(output, 0).write_text(row(names[4], "stale"))
    status = caption_paths_sharded([str(tmp_path / "photos" / "p0.jpg")], fake_captioner, DecodeConfig(),
                                   BatchOptions(output=output, overwrite=True, batch_size=2, progress=False))
    assert status == 0 and [r["image"] for r in jsonl_rows(output)] == [names[0]]
    assert not rank_file(output, 0).exists()
