"""Caption files, folders and globs in batches: `captioner caption PATH...`.

This door finds the files (`expand_inputs`), runs them through the library's one pipeline
(`Captioner.stream`: loading, CNN per batch, the batched decoder per group of batches) and writes the rows.
An unreadable file becomes an error row (path and reason, also on stderr) and the rest continue. Results
are appended and flushed after each decoded group (128 images by default), so a crash loses at most the
group in flight, and `--resume` skips images already in the output file.

Under torchrun, `caption_paths_sharded` gives each rank a share of the images and merges the shares into
one output file.

Exit status: 0 every image captioned, 1 some failed, 2 bad usage (e.g. the output exists without
--resume, or no checkpoint).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from captioner import distributed
from captioner.api import Captioner
from captioner.config import DecodeConfig
from captioner.images import not_a_regular_file
from captioner.utils import progress_bar, write_text_atomic

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".heic",
                    ".heif", ".avif"}
CSV_FIELDS = ["image", "rank", "caption", "log_prob", "score", "error"]


# ---------------------------------------------------------------------------------------- inputs
def expand_inputs(inputs: Iterable[str], recursive: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Files, folders and glob patterns -> (image paths in a stable order, [(input, problem)]).

    Folders contribute files with an image extension (sorted; sub-folders only with `recursive`,
    never following symlinked folders, so a symlink loop cannot trap the walk). A named file is
    always tried, whatever its extension. A path that is not a regular file (a named pipe, socket or
    device, which could block the reader forever) becomes a problem and is never opened.
    """
    paths: list[str] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        if os.path.isdir(item):
            paths.extend(_scan_folder(item, recursive))
        elif os.path.lexists(item):
            paths.append(item)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=recursive))
            if not matches:
                problems.append((item, "no file matches this pattern"))
            for match in matches:
                paths.extend(_scan_folder(match, recursive) if os.path.isdir(match) else [match])
        else:
            problems.append((item, "no such file or folder"))
    seen: set[str] = set()
    unique = [p for p in paths if not (p in seen or seen.add(p))]
    special = {path: reason for path in unique if (reason := not_a_regular_file(path)) is not None}
    problems.extend((path, special[path]) for path in unique if path in special)
    return [path for path in unique if path not in special], problems


def _scan_folder(folder: str, recursive: bool) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        if not recursive:
            dirs.clear()
        found.extend(os.path.join(root, f) for f in sorted(files) if Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    return found


# --------------------------------------------------------------------------------------- outputs
class ResultWriter:
    """Appends result rows to .jsonl / .csv (one write call and an fsync per decoded group) or rewrites
    .json atomically per group; reads back what an earlier run wrote, for --resume."""

    def __init__(self, path: str | Path, resume: bool):
        self.path = self.check_output(path, resume)
        self.format = self.path.suffix.lower().lstrip(".")
        self.rows: list[dict[str, Any]] = self._read_existing() if self.path.exists() else []
        self.done = {row["image"] for row in self.rows}

    @staticmethod
    def check_output(path: str | Path, resume: bool) -> Path:
        """Refuse an output file of an unknown format, or one that exists without `resume`."""
        path = Path(path)
        if path.suffix.lower() not in (".jsonl", ".csv", ".json"):
            raise ValueError(f"--output {path}: use a .jsonl, .csv or .json file")
        if path.exists() and not resume:
            raise ValueError(f"--output {path} already exists; pass --resume to continue it, or choose "
                             "another name (nothing is overwritten)")
        return path

    def _read_existing(self) -> list[dict[str, Any]]:
        # newline="": CSV rows end in \r\n, kept as written; surrogateescape: CSV keeps raw file names.
        with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
            text = handle.read()
        if self.format == "json":
            return json.loads(text) if text.strip() else []
        if text and not text.endswith("\n"):  # a line cut by a crash: drop it, it will be redone
            text = text[: text.rfind("\n") + 1]
            with open(self.path, "w", encoding="utf-8", errors="surrogateescape", newline="") as handle:
                handle.write(text)
        if self.format == "jsonl":  # split at \n only: JSON text may hold U+2028 and other line breaks
            return [json.loads(line) for line in text.split("\n") if line.strip()]
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        return [{"image": row["image"]} for row in rows]

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.format == "json":
            self.rows.extend(rows)
            write_text_atomic(self.path, _to_json(self.rows, indent=1))
            return
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        if self.format == "jsonl":
            text = "".join(_to_json(row) + "\n" for row in rows)
        else:
            buffer = io.StringIO(newline="")
            writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
            if new_file:
                writer.writeheader()
            for row in rows:
                writer.writerows(_csv_rows(row))
            text = buffer.getvalue()
        # One write call for the whole group: a process killed while writing leaves all of it or none of
        # it (a CSV image's n-best rows never end up split), and a cut line is repaired on --resume.
        data = text.encode("utf-8", errors="surrogateescape")
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _to_json(value: Any, **options: Any) -> str:
    """JSON that encodes as UTF-8. A file name that is not valid UTF-8 reaches us with lone surrogates
    (os.fsdecode); those rows are written with \\u escapes, which read back to the same name."""
    text = json.dumps(value, ensure_ascii=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, **options)
    return text


def _display(path: str) -> str:
    """A path printable on any UTF-8 terminal: bytes that are not UTF-8 are shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def _csv_rows(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if row["error"]:
        yield {"image": row["image"], "rank": "", "caption": "", "log_prob": "", "score": "", "error": row["error"]}
    for rank, caption in enumerate(row["captions"], start=1):
        yield {"image": row["image"], "rank": rank, "caption": caption["text"],
               "log_prob": f"{caption['log_prob']:.4f}", "score": f"{caption['score']:.4f}", "error": ""}


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


# ------------------------------------------------------------------------------------------ run
@dataclass(frozen=True)
class BatchOptions:
    """How `captioner caption` reads, batches and writes (the model and the decoding settings come apart)."""

    output: str | Path | None = None  # .jsonl, .csv or .json; None: print
    recursive: bool = False  # descend into sub-folders
    resume: bool = False  # skip images already in `output`
    batch_size: int = 32  # images per CNN batch
    decode_batch_size: int = 128  # images decoded together; results are written after each such group
    num_workers: int | None = None  # image loading processes (None: chosen for the device)
    progress: bool = True


def caption_paths(inputs: list[str], captioner: Captioner, config: DecodeConfig,
                  options: BatchOptions = BatchOptions()) -> int:
    """Caption every image named by `inputs` through the pipeline (`Captioner.stream`); returns the exit
    status (0 all ok, 1 some failed). The results of each decoded group are written before the next is
    loaded."""
    paths, problems = expand_inputs(inputs, options.recursive)
    writer = ResultWriter(options.output, options.resume) if options.output else None
    if writer is not None and writer.done:
        before = len(paths)
        paths = [p for p in paths if p not in writer.done]
        print(f"resuming: {before - len(paths)} images already in {writer.path}", file=sys.stderr)
    failures = 0

    def emit(rows: list[dict[str, Any]]) -> None:
        nonlocal failures
        for row in rows:
            if row["error"]:
                failures += 1
                print(f"error: {row['image']}: {row['error']}", file=sys.stderr)
            elif writer is None:
                print(f"{_display(row['image'])}\t{row['caption']}" if config.n_best == 1 else
                      f"{_display(row['image'])}\n" + "".join(f"  {c['score']:8.3f}  {c['text']}\n" for c in row["captions"]),
                      flush=True)
        if writer is not None:
            writer.write(rows)

    emit([result_row(item, error=problem) for item, problem in problems])
    bar = progress_bar(None, desc="captioning", enabled=options.progress, total=len(paths), unit="img")
    with bar:
        for group in captioner.stream(paths, config, batch_size=options.batch_size,
                                      decode_batch_size=options.decode_batch_size, num_workers=options.num_workers):
            emit([result_row(paths[item.index], item.captions, item.error) for item in group])
            bar.update(len(group))
    total = len(paths) + len(problems)
    print(f"captioned {total - failures} of {total} images" + (f"; {failures} failed" if failures else "")
          + (f"; results in {writer.path}" if writer else ""), file=sys.stderr)
    return 1 if failures else 0


# ------------------------------------------------------------------------------------ sharded captioning
def rank_file(output: str | Path, shard: int) -> Path:
    """Where rank `shard` writes its part of `output`: `<output>.rank<k>.jsonl`."""
    return Path(f"{output}.rank{shard}.jsonl")


def _rank_files(output: Path) -> list[Path]:
    return sorted(output.parent.glob(glob.escape(output.name) + ".rank*.jsonl"))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a rank file; a last line cut short by a crash is ignored (its image is redone)."""
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]


def check_sharded(output: str | Path | None, memory: str | Path | None) -> Path:
    """What `captioner caption` under torchrun needs, checked on every rank before any loading or waiting:
    an --output to merge into, of a known format, and no --memory."""
    if memory is not None:
        raise ValueError("--memory runs in one process; start it without torchrun")
    if output is None:
        raise ValueError("under torchrun, `captioner caption` needs --output: every process writes its share "
                         "of the images and rank 0 merges them into that file")
    output = Path(output)
    if output.suffix.lower() not in (".jsonl", ".csv", ".json"):
        raise ValueError(f"--output {output}: use a .jsonl, .csv or .json file")
    return output


def caption_paths_sharded(inputs: list[str], captioner: Captioner, config: DecodeConfig,
                          options: BatchOptions) -> int:
    """`captioner caption` under torchrun: rank k captions its share of the images into
    `<output>.rank<k>.jsonl`, then rank 0 merges the shares into `options.output` in input order and
    deletes them.

    `--resume` skips images in the output and in rank files left by an interrupted sharded run (whatever
    its number of processes). Every rank returns the same exit status (0 all captioned, 1 some failed).
    """
    output = check_sharded(options.output, None)
    resume, batch_size = options.resume, options.batch_size
    paths, problems = expand_inputs(inputs, options.recursive)
    leftovers = _rank_files(output)
    if not resume and (output.exists() or leftovers):
        existing = output if output.exists() else leftovers[0]
        raise ValueError(f"{existing} already exists; pass --resume to continue it, or choose another --output "
                         "(nothing is overwritten)")
    # Rank 0 reads (and repairs) what earlier runs left; every rank then works on the same list.
    done: set[str] | None = None
    if distributed.is_main():
        done = set(ResultWriter(output, resume=True).done) if output.exists() else set()
        for path in leftovers:
            done.update(row["image"] for row in _read_rows(path))
    done = distributed.broadcast_object(done)
    todo = [path for path in paths if path not in done]
    mine = [todo[position] for position in distributed.shard_batches(len(todo), batch_size)]
    status = caption_paths(mine, captioner, config, replace(
        options, output=rank_file(output, distributed.rank()), recursive=False, resume=True,
        progress=options.progress and distributed.is_main()))
    statuses = distributed.all_gather_object(status)
    if distributed.is_main():
        writer = ResultWriter(output, resume=True)
        rows: dict[str, dict[str, Any]] = {}
        for path in _rank_files(output):
            for row in _read_rows(path):
                rows.setdefault(row["image"], row)
        for item, problem in problems:
            print(f"error: {item}: {problem}", file=sys.stderr)
        merged = [result_row(item, error=problem) for item, problem in problems]
        merged += [rows[path] for path in paths if path not in writer.done and path in rows]
        writer.write(merged)
        for path in _rank_files(output):
            path.unlink()
        print(f"merged the shares of {distributed.world_size()} process(es) into {output}", file=sys.stderr)
    distributed.barrier()
    return 1 if problems or max(statuses) else 0
