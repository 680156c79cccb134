"""Caption files, folders and globs in batches: `captioner caption PATH...`.

This door finds the files (`inputs.expand_inputs`), runs them through the library's one pipeline
(`Captioner.stream`: loading, CNN per batch, the batched decoder per group of batches) and writes the rows
(`outputs.ResultWriter`). An input that gives no image, or a file that does not load, becomes an error row
(path and reason, also on stderr) and the rest continue. Results are appended and flushed after each decoded
group (128 images by default), so a crash loses at most the group in flight; `--resume` skips images already
captioned in the output file and tries again those that failed.

Under torchrun, `caption_paths_sharded` gives each rank a share of the images and merges the shares into
one output file.

Exit status: 0 every image captioned, 1 some failed, 2 bad usage (e.g. the output exists without --resume or
--overwrite, no image among the inputs, an output that cannot be written, or no checkpoint).
"""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from captioner import distributed
from captioner.api import Captioner
from captioner.apps.inputs import InputScan, expand_inputs
from captioner.apps.outputs import ResultWriter, check_output, read_rows, result_row
from captioner.config import DecodeConfig
from captioner.utils import printable, progress_bar


# ------------------------------------------------------------------------------------------ run
@dataclass(frozen=True)
class BatchOptions:
    """How `captioner caption` reads, batches and writes (the model and the decoding settings come apart)."""

    output: str | Path | None = None  # .jsonl, .csv or .json; None: print
    recursive: bool = False  # descend into sub-folders
    resume: bool = False  # skip images already captioned in `output`, try again those that failed
    overwrite: bool = False  # replace an existing `output` (when the first results are ready)
    batch_size: int = 32  # images per CNN batch
    decode_batch_size: int = 128  # images decoded together; results are written after each such group
    num_workers: int | None = None  # image loading processes (None: chosen for the device)
    progress: bool = True


def caption_paths(inputs: list[str] | InputScan, captioner: Captioner, config: DecodeConfig,
                  options: BatchOptions = BatchOptions()) -> int:
    """Caption every image named by `inputs` (paths, folders and globs, or their `expand_inputs` scan) through
    the pipeline (`Captioner.stream`); returns the exit status (0 all ok, 1 some failed). The results of
    each decoded group are written before the next is loaded. NoImagesError when the inputs name no image."""
    scan = inputs if isinstance(inputs, InputScan) else expand_inputs(inputs, options.recursive).require_images()
    paths, problems = scan.paths, scan.problems
    writer = ResultWriter(options.output, options.resume, options.overwrite) if options.output else None
    already = 0
    if writer is not None and (writer.done or writer.retried):
        before = len(paths)
        paths = [p for p in paths if p not in writer.done]
        already = before - len(paths)
        print(printable(f"resuming: {already} images already in {writer.path}")
              + (f"; trying again the {writer.retried} that failed" if writer.retried else ""), file=sys.stderr)
    failures = 0

    def emit(rows: list[dict[str, Any]]) -> None:
        nonlocal failures
        for row in rows:
            if row["error"]:
                failures += 1
                print(printable(f"error: {row['image']}: {row['error']}"), file=sys.stderr)
            elif writer is None:
                print(f"{printable(row['image'])}\t{printable(row['caption'])}" if config.n_best == 1 else
                      printable(row["image"]) + "\n"
                      + "".join(f"  {c['score']:8.3f}  {printable(c['text'])}\n" for c in row["captions"]), flush=True)
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
    where = printable(f"; results in {writer.path}") if writer else ""
    if total == 0:
        print(f"nothing left to caption: all {already} images were done before{where}", file=sys.stderr)
    else:
        print(f"captioned {total - failures} of {total} images" + (f"; {failures} failed" if failures else "")
              + (f" ({already} more were done before)" if already else "") + where, file=sys.stderr)
    return 1 if failures else 0


# ------------------------------------------------------------------------------------ sharded captioning
def rank_file(output: str | Path, shard: int) -> Path:
    """Where rank `shard` writes its part of `output`: `<output>.rank<k>.jsonl`."""
    return Path(f"{output}.rank{shard}.jsonl")


def _rank_files(output: Path) -> list[Path]:
    return sorted(output.parent.glob(glob.escape(output.name) + ".rank*.jsonl"))


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
        raise ValueError(f"--output {printable(str(output))}: use a .jsonl, .csv or .json file")
    return output


def caption_paths_sharded(inputs: list[str], captioner: Captioner, config: DecodeConfig,
                          options: BatchOptions) -> int:
    """`captioner caption` under torchrun: rank k captions its share of the images into
    `<output>.rank<k>.jsonl`, then rank 0 merges the shares into `options.output` in input order and
    deletes them.

    `--resume` skips images captioned in the output and in rank files left by an interrupted sharded run
    (whatever its number of processes), and tries again those that failed; `--overwrite` starts afresh
    (leftover rank files are deleted; the output is replaced by the merge). Every rank returns the same exit
    status (0 all captioned, 1 some failed).
    """
    output = check_sharded(options.output, None)
    resume, overwrite, batch_size = options.resume, options.overwrite, options.batch_size
    scan = expand_inputs(inputs, options.recursive).require_images()
    paths, problems = scan.paths, scan.problems
    leftovers = _rank_files(output)
    if not (resume or overwrite) and (output.exists() or leftovers):
        existing = output if output.exists() else leftovers[0]
        raise ValueError(printable(f"{existing} already exists")
                         + "; pass --resume to continue it, --overwrite to replace it, or choose another --output "
                         "(nothing is overwritten)")
    check_output(output, resume, overwrite)
    # Rank 0 reads (and repairs) what earlier runs left; every rank then works on the same list.
    done: set[str] | None = None
    if distributed.is_main():
        done = set()
        if overwrite:
            for path in leftovers:
                path.unlink()
        else:
            done = set(ResultWriter(output, resume=True).done) if output.exists() else set()
            for path in leftovers:
                done.update(row["image"] for row in read_rows(path) if not row["error"])
    done = distributed.broadcast_object(done)
    todo = [path for path in paths if path not in done]
    mine = [todo[position] for position in distributed.shard_batches(len(todo), batch_size)]
    status = caption_paths(InputScan(mine), captioner, config, replace(
        options, output=rank_file(output, distributed.rank()), recursive=False, resume=True, overwrite=False,
        progress=options.progress and distributed.is_main()))
    statuses = distributed.all_gather_object(status)
    if distributed.is_main():
        writer = ResultWriter(output, resume=not overwrite, overwrite=overwrite)
        rows: dict[str, dict[str, Any]] = {}
        for path in _rank_files(output):
            for row in read_rows(path):
                if row["image"] not in rows or (rows[row["image"]]["error"] and not row["error"]):
                    rows[row["image"]] = row  # a retried image: its new row, not the old error
        for item, problem in problems:
            print(printable(f"error: {item}: {problem}"), file=sys.stderr)
        merged = [result_row(item, error=problem) for item, problem in problems]
        merged += [rows[path] for path in paths if path not in writer.done and path in rows]
        writer.write(merged)
        for path in _rank_files(output):
            path.unlink()
        print(printable(f"merged the shares of {distributed.world_size()} process(es) into {output}"),
              file=sys.stderr)
    distributed.barrier()
    return 1 if problems or max(statuses) else 0
