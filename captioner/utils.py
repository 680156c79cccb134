"""Small helpers shared by the library: progress reports, text safe to print, atomic file writes, device
choice."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(iterable: Iterable[T] | None = None, desc: str = "", enabled: bool = True,
                 **kwargs: Any) -> tqdm | LineProgress:
    """The progress report of a long stage: a tqdm bar when stderr is a terminal; when it is not (a log file,
    a pipe), a plain line now and then (`LineProgress`); nothing when `enabled` is False.

    kwargs: tqdm's `total`, `initial`, `unit` and so on. Either kind iterates over `iterable` (counting each
    item) or counts `update(n)` calls, and works as a context manager."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(iterable, desc=desc, total=kwargs.get("total"), initial=kwargs.get("initial", 0),
                            unit=kwargs.get("unit", "it"))
    return tqdm(iterable, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, **kwargs)


class LineProgress:
    """Progress as plain lines on stderr, for logs and pipes where a redrawn bar would be noise.

    A line when the count reaches the next tenth of `total`, or `every_seconds` after the last line
    (whichever comes first); nothing in the first `quiet_seconds`, so a short stage prints nothing. When
    it printed anything, closing prints the final count. The line: `features: 4200/8091 img (52%), 3m10s,
    about 2m55s left`."""

    def __init__(self, iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None,
                 initial: int = 0, unit: str = "it", every_seconds: float = 30.0, quiet_seconds: float = 5.0,
                 clock: Callable[[], float] | None = None) -> None:
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.n = self.initial = initial
        self.every_seconds, self.quiet_seconds = every_seconds, quiet_seconds
        self.clock = clock or time.monotonic
        self.start = self.last_time = self.clock()
        self.last_n = initial
        self.last_tenth = self._tenth(initial)
        self.postfix = ""
        self.printed = False
        self.closed = False

    def _tenth(self, n: int) -> int:
        return 10 * n // self.total if self.total else 0

    def __iter__(self) -> Iterator[T]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.start < self.quiet_seconds:
            return
        if self._tenth(self.n) > self.last_tenth or now - self.last_time >= self.every_seconds:
            self._print(now)

    def set_postfix(self, values: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        values = {**(values or {}), **kwargs}
        self.postfix = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                                 for key, value in values.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self.closed and self.printed and self.n != self.last_n:
            self._print(self.clock())
        self.closed = True

    def _print(self, now: float) -> None:
        elapsed = now - self.start
        count = (f"{self.n}/{self.total} {self.unit} ({100 * self.n // self.total}%)" if self.total
                 else f"{self.n} {self.unit}")
        parts = [f"{self.desc}: {count}" if self.desc else count, duration(elapsed)]
        done_here = self.n - self.initial
        if self.total and 0 < done_here and self.n < self.total:
            parts.append(f"about {duration(elapsed / done_here * (self.total - self.n))} left")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=sys.stderr, flush=True)
        self.last_time, self.last_n, self.last_tenth, self.printed = now, self.n, self._tenth(self.n), True


def duration(seconds: float) -> str:
    """`42s`, `3m10s`, `2h05m`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def printable(text: str) -> str:
    """`text` safe to print on one terminal line: bytes of a file name that are not UTF-8 (held as lone
    surrogates) appear as \\xNN, and line breaks, escape sequences and other characters that are not
    printable (control, format and separator characters such as U+2028 or a right-to-left override) as
    \\n, \\x1b, \\u2028 and so on, so a hostile name can neither split a message nor drive the terminal."""
    try:
        text = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        text = text.encode("utf-8", errors="backslashreplace").decode("utf-8")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def default_file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file (0o666 less the umask); temp files from
    `tempfile.mkstemp` are 0o600, so atomic writes chmod them to this before the rename."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_replace(path: str | Path) -> Iterator[Path]:
    """Yield a temp file beside `path` to write; on success it is fsynced, given the usual file mode and
    renamed onto `path`, so readers see the old file or the new one, never half. On error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file via a temp file + rename (`atomic_replace`)."""
    with atomic_replace(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The one device rule: 'auto' takes CUDA when present, else the CPU. Under torchrun (LOCAL_RANK set),
    'auto' and 'cuda' mean this process's own GPU, cuda:LOCAL_RANK."""
    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        local_rank, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"torchrun started process {local_rank} on this machine, which has {count} GPU(s): "
                             f"use --nproc-per-node {count} or fewer")
        device = f"cuda:{local_rank}"
    return torch.device(device)


def check_output_folder(folder: Path, resume: bool, overwrite: bool, what: str,
                        error: type[Exception] = ValueError) -> None:
    """What every door that writes `what` (a run, a feature cache) into a folder refuses alike: --resume
    with --overwrite, and a file where the folder should be."""
    if resume and overwrite:
        raise error(f"{folder}: --resume continues the {what} there and --overwrite replaces it; give one of them")
    if folder.exists() and not folder.is_dir():
        raise error(f"{folder}: a file, not a folder; give a folder for the {what} as --out")
