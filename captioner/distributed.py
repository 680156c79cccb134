"""Data-parallel runs under torchrun: the process group, who we are in it, and the few collectives we use.

torchrun starts one process per GPU (or per share of the CPU) on every machine and tells each one its
place through environment variables: RANK (0..WORLD_SIZE-1 over all machines), WORLD_SIZE, LOCAL_RANK
(the process's number on its own machine, which picks its GPU) and MASTER_ADDR/MASTER_PORT (where the
group meets). `session()` joins that group for the length of a command: NCCL for CUDA training, gloo
on the CPU and for the inference commands, whose only collectives are small Python objects and
barriers. Outside torchrun every helper answers as the only process would (rank 0 of 1, gathers
return `[obj]`, barriers return at once), so library code calls them unconditionally.

Sharded doors live here too: `caption_paths_sharded` runs `captioner caption` as one shard per rank and
merges the shards into one output file.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# Rank 0 merges caches, scores validation and writes checkpoints while the others wait at a barrier.
TIMEOUT = timedelta(minutes=60)


def launched() -> bool:
    """True in a process started by torchrun (or another launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    """This process's number on its machine (its GPU under torchrun); 0 outside a launcher."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_distributed() -> bool:
    """More than one process takes part: shard the work and combine the results."""
    return world_size() > 1


def is_main() -> bool:
    """Rank 0: the process that writes files and prints."""
    return rank() == 0


def init(device: torch.device, backend: str | None = None) -> bool:
    """Join torchrun's process group; returns True if this call created it (False outside torchrun or
    when a group exists already). `backend` defaults to NCCL on CUDA and gloo otherwise."""
    if not launched() or is_initialized():
        return False
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run without torchrun")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group(backend, timeout=TIMEOUT)
    return True


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(device: torch.device, backend: str | None = None) -> Iterator[None]:
    """The process group for the length of a `with` block: joined on entry under torchrun, left on exit."""
    created = init(device, backend)
    try:
        yield
    finally:
        if created:
            cleanup()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, indexed by rank (pickled between our own processes)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` as rank `src` has it, on every rank (the other ranks' argument is ignored)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """Element-wise sums over ranks, in float64 (exact for token counts below 2**53)."""
    if not is_distributed():
        return [float(v) for v in values]
    if device is None or dist.get_backend() != "nccl":
        device = torch.device("cpu")
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only, so a run of N processes reports once."""
    if is_main():
        print(*args, **kwargs)


def shard_batches(count: int, batch_size: int, shard: int | None = None, shards: int | None = None) -> list[int]:
    """Positions 0..count-1 of this rank's share when the work is cut into batches of `batch_size` and
    batch b goes to rank b % shards. Each rank's batches are then exactly the batches a single process
    would form, so batch-size-dependent kernels give the same numbers as a one-process run."""
    shard = rank() if shard is None else shard
    shards = world_size() if shards is None else shards
    return [position for start in range(shard * batch_size, count, shards * batch_size)
            for position in range(start, min(start + batch_size, count))]


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


def caption_paths_sharded(inputs: list[str], checkpoint: str | Path, config: Any, output: str | Path | None,
                          recursive: bool = False, resume: bool = False, batch_size: int = 32,
                          num_workers: int | None = None, device: str = "auto", progress: bool = True,
                          decode_batch_size: int = 128, max_pixels: int | None = None) -> int:
    """`captioner caption` under torchrun: rank k captions its share of the images into
    `<output>.rank<k>.jsonl`, then rank 0 merges the shares into `output` in input order and deletes them.

    `--resume` skips images in `output` and in rank files left by an interrupted sharded run (whatever
    its number of processes). Every rank returns the same exit status (0 all captioned, 1 some failed).
    """
    from captioner.batch import ResultWriter, _row, caption_paths, expand_inputs

    if output is None:
        raise ValueError("under torchrun, `captioner caption` needs --output: every process writes its share "
                         "of the images and rank 0 merges them into that file")
    output = Path(output)
    if output.suffix.lower() not in (".jsonl", ".csv", ".json"):  # checked on every rank, before any waits
        raise ValueError(f"--output {output}: use a .jsonl, .csv or .json file")
    paths, problems = expand_inputs(inputs, recursive)
    leftovers = _rank_files(output)
    if not resume and (output.exists() or leftovers):
        existing = output if output.exists() else leftovers[0]
        raise ValueError(f"{existing} already exists; pass --resume to continue it, or choose another --output "
                         "(nothing is overwritten)")
    # Rank 0 reads (and repairs) what earlier runs left; every rank then works on the same list.
    done: set[str] | None = None
    if is_main():
        done = set(ResultWriter(output, resume=True).done) if output.exists() else set()
        for path in leftovers:
            done.update(row["image"] for row in _read_rows(path))
    done = broadcast_object(done)
    todo = [path for path in paths if path not in done]
    mine = [todo[position] for position in shard_batches(len(todo), batch_size)]
    status = caption_paths(mine, checkpoint=checkpoint, config=config, output=str(rank_file(output, rank())),
                           resume=True, batch_size=batch_size, num_workers=num_workers, device=device,
                           progress=progress and is_main(), decode_batch_size=decode_batch_size,
                           max_pixels=max_pixels)
    statuses = all_gather_object(status)
    if is_main():
        writer = ResultWriter(output, resume=True)
        rows: dict[str, dict[str, Any]] = {}
        for path in _rank_files(output):
            for row in _read_rows(path):
                rows.setdefault(row["image"], row)
        for item, problem in problems:
            print(f"error: {item}: {problem}", file=sys.stderr)
        merged = [_row(item, error=problem) for item, problem in problems]
        merged += [rows[path] for path in paths if path not in writer.done and path in rows]
        writer.write(merged)
        for path in _rank_files(output):
            path.unlink()
        print(f"merged the shares of {world_size()} process(es) into {output}", file=sys.stderr)
    barrier()
    return 1 if problems or max(statuses) else 0
