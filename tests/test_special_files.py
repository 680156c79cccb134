"""Named pipes, sockets and devices are never opened; a read that stalls times out instead of hanging."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
from PIL import Image

from captioner.apps.cli import main
from captioner.apps.inputs import expand_inputs
from captioner.images import ImageLoadError, load_image, read_descriptor

EXAMPLES = Path(__file__).resolve().parents[1] / "demo" / "examples"
# Short enough that a regression (opening the pipe) fails these tests quickly instead of hanging them.
TIMEOUT = 5.0


@pytest.fixture
def special_folder(tmp_path: Path):
    """Two good photos beside a named pipe and a Unix socket, both named like photos."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("cat.jpg", "coffee.jpg"):
        shutil.copy(EXAMPLES / name, folder / name)
    os.mkfifo(folder / "fifo.jpg")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(folder / "socket.jpg"))
    server.listen(1)
    yield folder
    server.close()


def test_load_image_refuses_special_files(special_folder: Path) -> None:
    cases = {special_folder / "fifo.jpg": "not a regular file: named pipe",
             special_folder / "socket.jpg": "not a regular file: socket"}
    if os.path.exists("/dev/zero"):
        cases[Path("/dev/zero")] = "not a regular file: character device"  # would never end
    link = special_folder / "link.jpg"
    link.symlink_to(special_folder / "fifo.jpg")  # symlinks are followed to what they name
    cases[link] = "not a regular file: named pipe"
    for path, reason in cases.items():
        with pytest.raises(ImageLoadError) as caught:
            load_image(path, read_timeout=TIMEOUT)
        assert caught.value.reason == reason and caught.value.path == str(path)


def test_input_walk_reports_special_files_without_opening_them(special_folder: Path) -> None:
    paths, problems = expand_inputs([str(special_folder)])
    assert [Path(p).name for p in paths] == ["cat.jpg", "coffee.jpg"]
    assert sorted((Path(item).name, reason) for item, reason in problems) == [
        ("fifo.jpg", "not a regular file: named pipe"), ("socket.jpg", "not a regular file: socket")]
    # a pipe named on the command line, whatever its extension, is reported the same way
    os.mkfifo(special_folder / "pipe")
    paths, problems = expand_inputs([str(special_folder / "pipe")])
    assert paths == [] and problems == [(str(special_folder / "pipe"), "not a regular file: named pipe")]


@pytest.mark.slow
def test_batch_with_a_pipe_and_a_socket_finishes(special_folder: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "out.jsonl"
    status = main(["caption", str(special_folder), "--output", str(output)])
    assert status == 1
    rows = {Path(row["image"]).name: row for row in map(json.loads, output.read_text().splitlines())}
    assert set(rows) == {"cat.jpg", "coffee.jpg", "fifo.jpg", "socket.jpg"}
    assert rows["cat.jpg"]["caption"] and rows["coffee.jpg"]["caption"]
    assert rows["fifo.jpg"]["error"] == "not a regular file: named pipe" and rows["fifo.jpg"]["caption"] is None
    assert rows["socket.jpg"]["error"] == "not a regular file: socket"
    assert "2 failed" in capsys.readouterr().err


class StalledWriter:
    """Opens a named pipe for writing, writes a few bytes, then stalls (holds it open, writes nothing)."""

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with open(self.fifo, "wb", buffering=0) as pipe:
            pipe.write(b"\xff\xd8\xff\xe0")  # the start of a JPEG
            self.release.wait(30)

    def close(self) -> None:
        self.release.set()
        self.thread.join(5)


def test_read_that_stalls_times_out(tmp_path: Path) -> None:
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    writer = StalledWriter(fifo)
    descriptor = os.open(fifo, os.O_RDONLY)  # returns once the writer has opened its end
    try:
        with pytest.raises(ImageLoadError, match="timed out reading: no data for 0.5 s"):
            read_descriptor(descriptor, str(fifo), timeout=0.5)
    finally:
        writer.close()  # the abandoned read then sees the end of the pipe and finishes
        os.close(descriptor)


def test_read_that_keeps_delivering_is_not_cut_off(tmp_path: Path) -> None:
    """The timeout is on silence, not on the whole read: a slow but steady writer is read to the end."""
    fifo = tmp_path / "slow"
    os.mkfifo(fifo)
    chunks = [bytes([n]) * 1000 for n in range(8)]

    def write_slowly() -> None:
        with open(fifo, "wb", buffering=0) as pipe:
            for chunk in chunks:
                pipe.write(chunk)
                threading.Event().wait(0.1)

    thread = threading.Thread(target=write_slowly, daemon=True)
    thread.start()
    descriptor = os.open(fifo, os.O_RDONLY)
    try:
        assert read_descriptor(descriptor, str(fifo), timeout=0.5) == b"".join(chunks)  # 0.8 s in all
    finally:
        os.close(descriptor)
        thread.join(5)


def test_load_image_times_out_on_a_stalled_regular_file(tmp_path: Path, monkeypatch) -> None:
    """A regular file whose reads stop returning (as on a stalled network mount) gives an error row's reason."""
    path = tmp_path / "on-a-dead-mount.jpg"
    Image.new("RGB", (8, 8)).save(path)
    inode = path.stat().st_ino
    release = threading.Event()
    real_read = os.read

    def stalling_read(descriptor: int, size: int) -> bytes:
        if os.fstat(descriptor).st_ino == inode:
            release.wait(30)
        return real_read(descriptor, size)

    monkeypatch.setattr(os, "read", stalling_read)  # read_image_file reads with os.read
    try:
        with pytest.raises(ImageLoadError, match="timed out reading") as caught:
            load_image(path, read_timeout=0.3)
        assert caught.value.path == str(path)
    finally:
        release.set()
