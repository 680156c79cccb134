"""Small helpers shared by the library: progress bars, atomic file writes, device choice."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], desc: str = "", enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on a terminal; silent when stderr is piped or `enabled` is False."""
    return tqdm(iterable, desc=desc, disable=not (enabled and sys.stderr.isatty()), leave=False,
                dynamic_ncols=True, **kwargs)


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
