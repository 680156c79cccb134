"""The results file of `captioner caption --output`: JSON lines, CSV or one JSON list.

Promises, each checked by tests/test_outputs.py:
- nothing is overwritten unless asked: an existing file is continued with `resume` or replaced with
  `overwrite` (atomically, when the first results are ready), refused otherwise;
- rows are written a decoded group at a time in one write call, and a group that cannot be written in full
  (a full disk, an interrupt) is cut off again, so the file always ends after a whole group;
- on `resume`, the rows already captioned are kept byte for byte; error rows are dropped and their inputs
  tried again (each input ends up with one row), and a last record cut short by a crash is dropped (a CSV
  record is parsed, so a line break inside a quoted file name is not mistaken for its end);
- CSV cells that a spreadsheet would run as a formula (text starting with = + - @, a tab, a carriage return)
  get a leading apostrophe, as OWASP recommends, and so does text starting with an apostrophe, so that
  reading a cell back takes exactly one apostrophe off;
- a file that cannot be read or written ends in one `OutputError` line naming it, the problem and the fix.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.utils import atomic_replace, printable

OUTPUT_SUFFIXES = (".jsonl", ".csv", ".json")
CSV_FIELDS = ["image", "rank", "caption", "log_prob", "score", "error"]
CSV_TEXT_FIELDS = ("image", "caption", "error")  # the others are numbers this module formats
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class OutputError(ValueError):
    """A results file that cannot be used, read or written (a usage or setup problem: exit status 2)."""


def check_output(path: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output that could not be written: an unknown format, a folder, an existing
    file without `resume` or `overwrite`, a place on a read-only filesystem or without write permission.
    Missing folders on the way are fine (they are created with the first results)."""
    path = Path(path)
    shown = printable(str(path))
    if resume and overwrite:
        raise OutputError("--resume continues the output file and --overwrite replaces it: give one of them")
    status = _stat(path)
    if status is not None and stat.S_ISDIR(status.st_mode):
        raise OutputError(f"--output {shown} is a folder: name a results file in it, e.g. "
                          f"{printable(str(path / 'results.jsonl'))}")
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise OutputError(f"--output {shown}: use a .jsonl, .csv or .json file")
    if status is not None and not stat.S_ISREG(status.st_mode):
        raise OutputError(f"--output {shown} exists and is not a regular file: choose another --output")
    if status is not None and not (resume or overwrite):
        raise OutputError(f"--output {shown} already exists: pass --resume to continue it, --overwrite to replace "
                          "it, or choose another name (nothing is overwritten)")
    existing = path if status is not None else _nearest_existing_folder(path)
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise OutputError(f"--output {shown}: {printable(str(existing))} is on a read-only filesystem; choose an "
                          "--output on a writable disk")
    if not os.access(existing, os.W_OK | (os.X_OK if existing != path else 0)):
        raise OutputError(f"--output {shown}: permission denied (cannot write to {printable(str(existing))}); "
                          "choose an --output in a folder you can write to")
    return path


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR) and not _blocked_by_a_file(path):
            return None
        raise output_error(path, error) from None


def _blocked_by_a_file(path: Path) -> bool:
    return any(parent.exists() and not parent.is_dir() for parent in path.parents)


def _nearest_existing_folder(path: Path) -> Path:
    return next((parent for parent in path.parents if parent.exists()), Path.cwd())


def output_error(path: Path, error: OSError, kept: int | None = None) -> OutputError:
    """The one-line message of an OSError on the results file. `kept`: results in the file (full disk)."""
    shown = printable(str(path))
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        kept_note = f"; the {kept} results written before are kept" if kept else "; nothing was written"
        return OutputError(f"--output {shown}: the disk is full ({error.strerror}){kept_note}: free some space, "
                           "then rerun with --resume")
    if error.errno == errno.EROFS:
        return OutputError(f"--output {shown} is on a read-only filesystem; choose an --output on a writable disk")
    if error.errno in (errno.EACCES, errno.EPERM):
        return OutputError(f"--output {shown}: permission denied; choose an --output in a folder you can write to")
    if error.errno == errno.EISDIR:
        return OutputError(f"--output {shown} is a folder: name a results file in it, e.g. "
                           f"{printable(str(path / 'results.jsonl'))}")
    if error.errno == errno.ENOTDIR or (error.errno == errno.EEXIST and _blocked_by_a_file(path)):
        blocker = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), path.parent)
        return OutputError(f"--output {shown}: {printable(str(blocker))} is a file, not a folder; choose another "
                           "--output")
    if error.errno == errno.ENAMETOOLONG:
        return OutputError(f"--output {shown}: the path is too long for this system; choose a shorter one")
    return OutputError(f"--output {shown}: cannot write it ({error.strerror or error}); choose another --output")


# ------------------------------------------------------------------------------------------ rows
def result_row(image: str, captions: list | None = None, error: str | None = None) -> dict[str, Any]:
    """One image's JSON row: its captions (best first) and the concepts they were made to mention (the best
    caption's; `[]` when concepts are off or none was confident), or the error."""
    captions = captions or []
    concepts = [{"word": c.word, "p": round(c.p, 3)} for c in getattr(captions[0], "concepts", [])] if captions else []
    rows = [{"text": c.text, "log_prob": round(c.log_prob, 4), "score": round(c.score, 4),
             **({"consensus": round(c.consensus, 4)} if getattr(c, "consensus", None) is not None else {}),
             **({"constraints_met": c.constraints_met} if getattr(c, "constraints_met", None) is not None else {})}
            for c in captions]
    return {"image": image, "caption": rows[0]["text"] if rows else None, "captions": rows, "concepts": concepts,
            "error": error}


def to_json(value: Any, **options: Any) -> str:
    """JSON that encodes as UTF-8. A file name that is not valid UTF-8 reaches us with lone surrogates
    (os.fsdecode); those rows are written with \\u escapes, which read back to the same name."""
    text = json.dumps(value, ensure_ascii=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, **options)
    return text


def csv_cell(text: str) -> str:
    """A text cell a spreadsheet shows as text: a leading apostrophe before = + - @ tab CR (and ')."""
    return "'" + text if text.startswith(FORMULA_START + ("'",)) else text


def from_csv_cell(text: str) -> str:
    return text[1:] if text.startswith("'") else text


def csv_rows(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One image's CSV rows: its error, or one row per caption (rank 1 = best)."""
    image = csv_cell(row["image"])
    if row["error"]:
        yield {"image": image, "rank": "", "caption": "", "log_prob": "", "score": "", "error": csv_cell(row["error"])}
    for rank, caption in enumerate(row["captions"], start=1):
        yield {"image": image, "rank": rank, "caption": csv_cell(caption["text"]),
               "log_prob": f"{caption['log_prob']:.4f}", "score": f"{caption['score']:.4f}", "error": ""}


# --------------------------------------------------------------------------------- existing files
@dataclass
class ExistingRows:
    """What a results file holds: its records' raw text (a CSV header first), each record's image and
    whether it is an error row, and whether its last record was cut short."""

    records: list[str]
    images: list[str | None]  # None: the CSV header
    errors: list[bool]
    cut: bool = False
    rows: list[dict[str, Any]] | None = None  # the rows themselves (.json: the file is rewritten from them)


class _Problem(Exception):
    """A bad record; the reader names the file."""


def _rewrite_hint(suffix: str) -> str:
    return ("repair or delete that line, or choose another --output (or --overwrite to replace the file)"
            if suffix != ".json" else "repair it, or choose another --output (or --overwrite to replace the file)")


def read_existing(path: Path) -> ExistingRows:
    """The records of an existing results file (see `ExistingRows`); OutputError for one that is not a
    results file or was damaged (naming the line)."""
    suffix = path.suffix.lower()
    try:
        # newline="": CSV rows end in \r\n, kept as written; surrogateescape: CSV keeps raw file names.
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
            text = handle.read()
    except OSError as error:
        raise OutputError(f"--output {printable(str(path))}: cannot read it ({error.strerror or error})") from None
    try:
        if suffix == ".json":
            return _read_json(text)
        return _read_jsonl(text) if suffix == ".jsonl" else _read_csv(text)
    except _Problem as problem:
        raise OutputError(f"--output {printable(str(path))}{problem}; {_rewrite_hint(suffix)}") from None


def _row_image(row: Any, where: str) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("image"), str):
        raise _Problem(f"{where}: a row without \"image\", not a result row of `captioner caption`")
    return row["image"]


def _read_json(text: str) -> ExistingRows:
    if not text.strip():
        return ExistingRows([], [], [], rows=[])
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise _Problem(f": not valid JSON ({error.msg}: line {error.lineno} column {error.colno})") from None
    if not isinstance(rows, list):
        raise _Problem(": not a list of result rows")
    images = [_row_image(row, f", row {number}") for number, row in enumerate(rows, start=1)]
    return ExistingRows([], images, [bool(row.get("error")) for row in rows], rows=rows)


def _read_jsonl(text: str) -> ExistingRows:
    lines = text.split("\n")  # at \n only: JSON text may hold U+2028 and other line breaks
    # a last line without its \n was cut short by a crash: dropped, its image redone
    existing = ExistingRows([], [], [], cut=lines[-1] != "")
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise _Problem(f", line {number}: not a JSON row ({error.msg}: column {error.colno})") from None
        existing.images.append(_row_image(row, f", line {number}"))
        existing.records.append(line + "\n")
        existing.errors.append(bool(row.get("error")))
    return existing


def _read_csv(text: str) -> ExistingRows:
    lines = io.StringIO(text, newline="").readlines()
    consumed: list[str] = []

    def feed() -> Iterator[str]:
        for line in lines:
            consumed.append(line)
            yield line

    reader = csv.reader(feed(), strict=True)
    existing = ExistingRows([], [], [])
    while True:
        start = len(consumed)
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            if len(consumed) == len(lines):  # the file ends inside a quoted cell: its last record was cut
                existing.cut = True
                break
            raise _Problem(f", line {start + 1}: not valid CSV ({error})") from None
        record = "".join(consumed[start:])
        if not record.endswith("\n"):  # the last record, without its line end: cut short
            existing.cut = True
            break
        if not existing.records:
            if cells != CSV_FIELDS:
                raise _Problem(f": its first line is not the results header {','.join(CSV_FIELDS)}, so it is not "
                               "a results file of `captioner caption`")
            existing.records.append(record)
            existing.images.append(None)
            existing.errors.append(False)
            continue
        if len(cells) != len(CSV_FIELDS) or not cells[0]:
            raise _Problem(f", line {start + 1}: a row without an image and {len(CSV_FIELDS)} cells")
        existing.records.append(record)
        existing.images.append(from_csv_cell(cells[0]))
        existing.errors.append(bool(cells[-1]))
    return existing


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines results file (a rank's share under torchrun); a last line cut short is
    ignored (its image is redone)."""
    existing = read_existing(path)
    return [json.loads(record) for record in existing.records]


# ------------------------------------------------------------------------------------------ writer
class ResultWriter:
    """Appends result rows to .jsonl / .csv (one write call and an fsync per decoded group) or rewrites
    .json atomically per group. On `resume` it reads what an earlier run wrote: `done` holds the images
    captioned there, and the error rows are dropped (`retried` of them) so those inputs are tried again."""

    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = False):
        self.path = check_output(path, resume, overwrite)
        self.format = self.path.suffix.lower().lstrip(".")
        self.rows: list[dict[str, Any]] = []  # .json: every row, rewritten per group
        self.done: set[str] = set()
        self.retried = 0
        self.count = 0  # results in the file
        self.replace = overwrite and self.path.exists()  # the first group replaces the file, atomically
        if self.path.exists() and not overwrite:
            self._continue()

    def _continue(self) -> None:
        existing = read_existing(self.path)
        keep = [not error for error in existing.errors]
        images = [image for image, kept in zip(existing.images, keep, strict=True) if kept and image is not None]
        self.done, self.count = set(images), len(set(images))
        self.retried = len({image for image, error in zip(existing.images, existing.errors, strict=True)
                            if error and image not in self.done})
        if existing.rows is not None:
            self.rows = [row for row, kept in zip(existing.rows, keep, strict=True) if kept]
        if existing.cut or not all(keep):
            if self.format == "json":
                text = to_json(self.rows, indent=1)
            else:
                text = "".join(record for record, kept in zip(existing.records, keep, strict=True) if kept)
            self._replace_file(text.encode("utf-8", errors="surrogateescape"))

    def _replace_file(self, data: bytes) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_replace(self.path) as temporary:
                temporary.write_bytes(data)
        except OSError as error:
            raise output_error(self.path, error, self.count) from None

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.format == "json":
            self.rows.extend(rows)
            self._replace_file(to_json(self.rows, indent=1).encode("utf-8"))
            self.count = len(self.rows)
            self.replace = False
            return
        if self.format == "jsonl":
            text = "".join(to_json(row) + "\n" for row in rows)
        else:
            buffer = io.StringIO(newline="")
            writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
            if self.replace or not self.path.exists() or self.path.stat().st_size == 0:
                writer.writeheader()
            for row in rows:
                writer.writerows(csv_rows(row))
            text = buffer.getvalue()
        data = text.encode("utf-8", errors="surrogateescape")
        if self.replace:
            self._replace_file(data)
            self.replace = False
        else:
            self._append(data)
        self.count += len(rows)

    def _append(self, data: bytes) -> None:
        # One write call for the whole group: a process killed while writing leaves all of it or none of
        # it (a CSV image's n-best rows never end up split). A write that fails part-way (a full disk) or
        # is interrupted is cut off again, so the file ends after the last whole group.
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as error:
            raise output_error(self.path, error, self.count) from None
        try:
            start = os.fstat(descriptor).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(descriptor, view):]
                os.fsync(descriptor)
            except BaseException as error:
                try:
                    os.ftruncate(descriptor, start)
                except OSError:
                    pass  # the cut record is dropped on --resume
                if isinstance(error, OSError):
                    raise output_error(self.path, error, self.count) from None
                raise
        finally:
            os.close(descriptor)
