"""Progress off a terminal: when stderr is a log file or a pipe, long stages print a plain line now and then
(each tenth, or every 30 s) instead of a bar that redraws itself."""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace

from captioner import utils
from captioner.apps.cli import main
from captioner.utils import LineProgress, duration, progress_bar


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_line_each_tenth_and_every_30_seconds_after_a_quiet_start(capsys):
    clock = Clock()
    with LineProgress(desc="features", total=200, unit="img", clock=clock) as bar:
        for second in range(1, 101):  # 2 images a second for 100 s
            clock.now += 1
            bar.update(2)
            if second == 50:
                bar.set_postfix({"loss": 2.3456789})
    lines = capsys.readouterr().err.splitlines()
    # nothing in the first 5 s; then a line at each new tenth (every 10 s here: sooner than 30 s)
    assert lines[0] == "features: 20/200 img (10%), 10s, about 1m30s left"
    assert lines[4] == "features: 100/200 img (50%), 50s, about 50s left"
    assert lines[5] == "features: 120/200 img (60%), 1m00s, about 40s left, loss=2.346"
    assert lines[-1] == "features: 200/200 img (100%), 1m40s, loss=2.346"
    assert len(lines) == 10


def test_a_slow_stage_prints_every_30_seconds_and_an_unknown_total_only_counts(capsys):
    clock = Clock()
    bar = LineProgress(desc="epoch 1", total=1000, clock=clock)
    for _ in range(100):  # 1 step every 2 s: a tenth takes 200 s, so the 30 s lines come first
        clock.now += 2
        bar.update()
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == ["epoch 1: 15/1000 it (1%), 30s, about 32m50s left",
                         "epoch 1: 30/1000 it (3%), 1m00s, about 32m20s left"]
    assert len(lines) == 7 and lines[-1] == "epoch 1: 100/1000 it (10%), 3m20s, about 30m00s left"  # the tenth
    counting = LineProgress(desc="captioning", clock=clock)
    for _ in range(40):
        clock.now += 1
        counting.update(3)
    assert capsys.readouterr().err.splitlines() == ["captioning: 90 it, 30s"]


def test_a_short_stage_prints_nothing(capsys):
    clock = Clock()
    with LineProgress(desc="captioning", total=10, clock=clock) as bar:
        for _ in range(10):
            clock.now += 0.4
            bar.update()
    assert capsys.readouterr().err == ""


def test_progress_bar_picks_lines_off_a_terminal_and_a_bar_on_one(monkeypatch):
    items = list(range(5))
    plain = progress_bar(items, desc="x", total=5)  # pytest's stderr is not a terminal
    assert isinstance(plain, LineProgress) and list(plain) == items and plain.n == 5
    assert not isinstance(progress_bar(items, enabled=False), LineProgress)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert not isinstance(progress_bar(items, desc="x"), LineProgress)
    assert [duration(s) for s in (4.4, 59.6, 61, 3599, 3600 * 2 + 300)] == ["4s", "1m00s", "1m01s", "59m59s",
                                                                             "2h05m"]


def test_caption_prints_progress_lines_when_stderr_is_a_log(tmp_path, fake_captioner, monkeypatch, capsys):
    for index in range(50):
        (tmp_path / f"p{index:02d}.jpg").write_bytes(b"photo")
    clock = Clock()

    def monotonic() -> float:  # 3 s per step of the run
        clock.now += 3
        return clock.now

    monkeypatch.setattr(utils, "time", SimpleNamespace(monotonic=monotonic))
    assert main(["caption", str(tmp_path), "-o", str(tmp_path / "out.jsonl"), "--decode-batch-size", "5"]) == 0
    lines = capsys.readouterr().err.splitlines()
    progress = [line for line in lines if line.startswith("captioning: ")]
    assert progress[0] == "captioning: 10/50 img (20%), 6s, about 24s left"
    assert progress[-1] == "captioning: 50/50 img (100%), 30s"
    assert all(re.fullmatch(r"captioning: \d+/50 img \(\d+%\), \d+s(, about \d+s left)?", line) for line in progress)
    assert lines[-1].startswith("captioned 50 of 50 images")


def test_disabled_progress_prints_nothing(capsys):
    with progress_bar(desc="x", enabled=False, total=3) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
