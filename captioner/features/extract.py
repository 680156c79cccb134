"""Build a feature cache from records: resumable, refusing to mix encoders, bad images listed and skipped.

Under torchrun the work is sharded (`captioner.features.sharded`) and the result is the same cache.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from captioner import distributed
from captioner.encoders.registry import Encoder
from captioner.features.cache import (
    META_FILE,
    PARTIAL_DIR,
    RANK_PARTIAL_GLOB,
    FeatureCache,
    PartialCache,
    cache_fingerprint,
    check_fingerprint,
    finish_cache,
    to_float16,
)
from captioner.features.encode import encoded_batches
from captioner.features.loader import jpeg_draft_size
from captioner.features.sharded import merge_partials, rank_number, rank_partial_dirs
from captioner.images import DEFAULT_MAX_PIXELS
from captioner.utils import progress_bar


def extract_features(
    records: Iterable[Any],
    encoder: Encoder,
    out_dir: str | Path,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    load_threads: int | None = None,
    channels_last: bool | None = None,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> FeatureCache:
    """Compute `encoder` features once per unique `image_id` of `records` into the cache at `out_dir`.

    records: CaptionRecords, or anything with `.image_id` and `.image_path`.
    Resumes an interrupted run in the same folder and adds images that a finished cache lacks; refuses a
    cache made with another encoder, weights or preprocessing (FeatureCacheError). Images that fail to
    load are skipped, listed in meta["failed"] with path and reason and reported in one warning; they are
    not retried on later runs (delete the cache to retry them). The encoder moves to `device`.
    num_workers, load_threads, channels_last, draft, max_pixels: see `image_loader`. num_workers=None
    (the default) picks by device: in-process threaded loading on CPU, worker processes on GPU.
    draft changes the pixels of photos whose shorter side is at least twice `jpeg_draft_size` (never those
    of Flickr8k or COCO, which are smaller), so it is recorded in meta.json ("jpeg_draft_size") but not
    compared when a cache is resumed: caches made before it existed stay usable.
    Under torchrun every rank calls this with the same records: each extracts its batches, rank 0 merges,
    and every rank returns the finished cache (see the module notes).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = cache_fingerprint(encoder)
    fingerprint["jpeg_draft_size"] = jpeg_draft_size(encoder.preprocessor) if draft else None

    wanted: dict[str, Path] = {}
    for record in records:
        wanted.setdefault(record.image_id, Path(record.image_path))
    options = dict(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress,
                   load_threads=load_threads, channels_last=channels_last, draft=draft, max_pixels=max_pixels)
    if distributed.is_distributed() or any(out_dir.glob(RANK_PARTIAL_GLOB)):
        return extract_sharded(wanted, encoder, out_dir, fingerprint, **options)

    partial_dir = out_dir / PARTIAL_DIR
    existing: FeatureCache | None = None
    if (out_dir / META_FILE).is_file():
        existing = FeatureCache.open(out_dir)
        check_fingerprint(existing.meta, fingerprint, out_dir / META_FILE)
        known = set(existing.index) | {entry["image_id"] for entry in existing.failed}
        if not partial_dir.exists() and all(image_id in known for image_id in wanted):
            return existing

    partial = PartialCache.resume_or_create(partial_dir, fingerprint, seed=existing)
    try:
        done = partial.done
        todo = [(image_id, path) for image_id, path in wanted.items() if image_id not in done]
        extract_into(partial, todo, encoder, len(done) + len(todo), len(done), **options)
    finally:
        partial.close()
    cache = finish_cache(out_dir, partial, fingerprint, encoder)
    warn_failed(partial.failed, out_dir)
    return cache


def extract_into(partial: PartialCache, todo: list[tuple[str, Path]], encoder: Encoder, total: int,
                initial: int, batch_size: int, num_workers: int | None, device: str | torch.device,
                progress: bool, load_threads: int | None, channels_last: bool | None, draft: bool,
                max_pixels: int) -> None:
    """Run the encoder over `todo` [(image_id, path)] in batches of `batch_size`, appending each batch."""
    if not todo:
        return
    device = torch.device(device)
    encoder.to(device)
    batches = encoded_batches([path for _, path in todo], encoder, batch_size=batch_size, num_workers=num_workers,
                              load_threads=load_threads, device=device, channels_last=channels_last, draft=draft,
                              max_pixels=max_pixels)
    bar = progress_bar(desc="features", enabled=progress, total=total, initial=initial, unit="img")
    with bar:
        for batch in batches:
            ids = [todo[position][0] for position in batch.indices]
            rows = to_float16(batch.features, ids)  # (B, feature_dim); exact, the features are float16 values
            failed = [{"image_id": todo[position][0], "path": str(todo[position][1]), "reason": reason}
                      for position, reason in batch.failures]
            partial.append(ids, rows, failed)
            bar.update(len(batch))


def warn_failed(failed: list[dict], out_dir: Path) -> None:
    if failed:
        shown = "\n  ".join(f"{entry['path']}: {entry['reason']}" for entry in failed[:10])
        more = f"\n  ... and {len(failed) - 10} more" if len(failed) > 10 else ""
        warnings.warn(f"{len(failed)} image(s) could not be loaded and have no features "
                      f"(listed in {out_dir / META_FILE}):\n  {shown}{more}", stacklevel=3)


def extract_sharded(wanted: dict[str, Path], encoder: Encoder, out_dir: Path, fingerprint: dict,
                    batch_size: int, progress: bool, **options: Any) -> FeatureCache:
    """extract_features over the ranks of a torchrun group (also used, with one rank, to finish the
    partial folders an interrupted sharded run left). Every rank returns the merged cache."""
    world, rank = distributed.world_size(), distributed.rank()
    existing: FeatureCache | None = None
    if (out_dir / META_FILE).is_file():
        existing = FeatureCache.open(out_dir)
        check_fingerprint(existing.meta, fingerprint, out_dir / META_FILE)
    known = (set(existing.index) | {entry["image_id"] for entry in existing.failed}) if existing else set()
    untouched = not (out_dir / PARTIAL_DIR).exists() and not any(out_dir.glob(RANK_PARTIAL_GLOB))
    distributed.barrier()  # every rank has looked before any rank writes
    if existing is not None and untouched and all(image_id in known for image_id in wanted):
        return existing

    own_dir = out_dir / (PARTIAL_DIR if rank == 0 else f"partial.rank{rank}")
    partial = PartialCache.resume_or_create(own_dir, fingerprint, seed=existing if rank == 0 else None)
    try:
        done = set(partial.done)
        if rank == 0:  # folders of ranks this run does not have (an earlier run with more processes)
            for directory in rank_partial_dirs(out_dir):
                if rank_number(directory) >= world:
                    done |= PartialCache.load(directory, fingerprint).done
        done = set().union(known, *distributed.all_gather_object(done))
        todo = [(image_id, path) for image_id, path in wanted.items() if image_id not in done]
        mine = [todo[position] for position in distributed.shard_batches(len(todo), batch_size)]
        extract_into(partial, mine, encoder, len(mine), 0, batch_size=batch_size,
                     progress=progress and rank == 0, **options)
    finally:
        partial.close()
    distributed.barrier()  # every shard is on disk
    if rank == 0:
        failed = merge_partials(out_dir, wanted, existing, fingerprint, encoder)
        warn_failed(failed, out_dir)
    distributed.barrier()
    return FeatureCache.open(out_dir)
