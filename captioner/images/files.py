"""Reading image files safely, before any decoding: only regular files are opened (a named pipe, socket or
device would block or never end), files larger than a pixel limit admits are refused unread, and reads run
in a worker thread that gives up when no byte arrives for a while (a stalled network mount).
`captioner.images.load.load_image` decodes what this reads; `ImageLoadError` is the error of both.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_READ_TIMEOUT = 30.0  # seconds without a byte before a read is given up
# Files are read into memory before decoding (so a stall can be timed out); the largest plain image a
# pixel limit admits stores 8 bytes a pixel (16-bit RGBA), so bigger files are refused unread.
_FILE_BYTES_PER_PIXEL = 8
_MIN_FILE_LIMIT = 64 * 2**20
_READ_CHUNK = 2**20

class ImageLoadError(ValueError):
    """An image could not be loaded. `.path` names the source, `.reason` says why in a few words."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def file_size_limit(max_pixels: int) -> int:
    """The largest file (bytes) `load_image` reads for a pixel limit: 8 bytes a pixel, at least 64 MiB."""
    return max(_MIN_FILE_LIMIT, _FILE_BYTES_PER_PIXEL * max_pixels)


def file_kind(mode: int) -> str | None:
    """None for a regular file (`os.stat(...).st_mode`), else what it is, in a few words."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """The error reason for a path that exists but is not a regular file (following symlinks), else None.

    For input walks: a named pipe or socket would block the reader, a device might never end. A path that
    cannot be stat'ed gives None here; opening it reports the real problem."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    kind = file_kind(mode)
    if kind is None:
        return None
    return "is a directory, not an image file" if kind == "directory" else f"not a regular file: {kind}"


def read_image_file(path: str | os.PathLike, timeout: float = DEFAULT_READ_TIMEOUT,
                    max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at `path`, or ImageLoadError with the reason.

    Only a regular file is opened (checked with os.stat, following symlinks, and again on the open
    descriptor). The stat, the open and the reads run in a worker thread; when it makes no progress for
    `timeout` seconds the call gives up with "timed out reading" (the thread is left to finish, or to stay
    stuck in the kernel, on its own: a read on a stalled network mount cannot be interrupted)."""
    name = str(Path(path))

    def work(progress: Callable[[], None]) -> bytes:
        try:
            status = os.stat(path)
        except FileNotFoundError:
            raise ImageLoadError(name, "file not found") from None
        except PermissionError:
            raise ImageLoadError(name, "permission denied") from None
        except OSError as error:
            raise ImageLoadError(name, f"cannot open file ({error.strerror or error})") from None
        _check_regular(status.st_mode, name)
        _check_size(status.st_size, name, max_bytes)
        progress()
        try:
            # O_NONBLOCK: should the path have become a named pipe since the stat, the open returns at
            # once instead of waiting for a writer (the fstat below then refuses it). No effect on files.
            descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except PermissionError:
            raise ImageLoadError(name, "permission denied") from None
        except OSError as error:
            raise ImageLoadError(name, f"cannot open file ({error.strerror or error})") from None
        try:
            _check_regular(os.fstat(descriptor).st_mode, name)
            return _read_all(descriptor, name, progress, max_bytes)
        finally:
            os.close(descriptor)

    return _with_stall_timeout(work, name, timeout)


def read_descriptor(descriptor: int, name: str, timeout: float = DEFAULT_READ_TIMEOUT,
                    max_bytes: int | None = None) -> bytes:
    """All bytes of an open file descriptor, giving up with ImageLoadError("timed out reading ...") when
    none arrives for `timeout` seconds. The descriptor stays open (it is the caller's)."""
    return _with_stall_timeout(lambda progress: _read_all(descriptor, name, progress, max_bytes), name, timeout)


def _check_regular(mode: int, name: str) -> None:
    kind = file_kind(mode)
    if kind == "directory":
        raise ImageLoadError(name, "is a directory, not an image file")
    if kind is not None:
        raise ImageLoadError(name, f"not a regular file: {kind}")


def _check_size(size: int, name: str, max_bytes: int | None) -> None:
    if size == 0:
        raise ImageLoadError(name, "empty file (0 bytes)")
    if max_bytes is not None and size > max_bytes:
        raise ImageLoadError(name, f"file too large ({size / 2**20:,.0f} MiB > {max_bytes / 2**20:,.0f} MiB read "
                                   "at this pixel limit; raise max_pixels to read it)")


def _read_all(descriptor: int, name: str, progress: Callable[[], None], max_bytes: int | None) -> bytes:
    chunks, total = [], 0
    while True:
        try:
            chunk = os.read(descriptor, _READ_CHUNK)
        except OSError as error:
            raise ImageLoadError(name, f"cannot read file ({error.strerror or error})") from None
        if not chunk:
            break
        progress()
        chunks.append(chunk)
        total += len(chunk)
        if max_bytes is not None and total > max_bytes:  # the file grew after the stat
            _check_size(total, name, max_bytes)
    _check_size(total, name, None)
    return b"".join(chunks)


def _with_stall_timeout(work: Callable[[Callable[[], None]], bytes], name: str, timeout: float) -> bytes:
    """Run `work(progress)` in a daemon thread; raise ImageLoadError when `progress()` is not called for
    `timeout` seconds before `work` returns."""
    last_progress = [time.monotonic()]
    outcome: dict[str, object] = {}
    finished = threading.Event()

    def progress() -> None:
        last_progress[0] = time.monotonic()

    def run() -> None:
        try:
            outcome["data"] = work(progress)
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error
        finally:
            finished.set()

    threading.Thread(target=run, name="read_image_file", daemon=True).start()
    while not finished.wait(max(0.0, last_progress[0] + timeout - time.monotonic())):
        if time.monotonic() - last_progress[0] >= timeout:
            raise ImageLoadError(name, f"timed out reading: no data for {timeout:g} s (a stalled network mount, "
                                       "or a pipe nobody writes to?)")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["data"]  # type: ignore[return-value]
