"""Extract pooled CNN features once per image and keep them in a compact, resumable cache.

A finished cache is a folder with three files:

    features.f16.npy   float16 rows (count, feature_dim), one per image, in index order
    index.json         {image_id: row} in row order
    meta.json          encoder, feature_dim, preprocessing, weights hash, count, failed images, format version

meta.json is written last, so a folder without it is not a finished cache. While extraction runs, batches
are appended to `partial/` (raw float16 rows + one JSON line per batch, each fsync'd), so an interrupted
run picks up after the last batch that reached the disk. A cache (finished or partial) made with another
encoder, other weights or other preprocessing is refused rather than mixed.

Under torchrun the images are cut into batches of `batch_size` and batch b goes to rank b % W; rank 0
appends to `partial/`, rank k to `partial.rank<k>/` (each resumable on its own), and rank 0 then merges
them into one cache identical to a single-process run's: the same index order (the input order), the
same float16 bytes, because every batch holds the images a single process would have put in it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import distributed
from .encoder import Encoder, Preprocessor
from .images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

FORMAT_VERSION = 1
FEATURES_FILE = "features.f16.npy"
INDEX_FILE = "index.json"
META_FILE = "meta.json"
PARTIAL_DIR = "partial"
_RANK_PARTIAL_GLOB = "partial.rank*"  # rank k > 0 of a sharded run: partial.rank<k>
_PARTIAL_ROWS = "features.f16.bin"
_PARTIAL_LOG = "batches.jsonl"
_PARTIAL_FINGERPRINT = "fingerprint.json"
# Fields that must agree for two sets of features to be mixed in one cache.
_FINGERPRINT_FIELDS = ("format_version", "encoder", "feature_dim", "dtype", "preprocessing", "weights_hash")


class FeatureCacheError(ValueError):
    """A feature cache is missing, incomplete, corrupt or made with another encoder; the message says which."""


def cache_fingerprint(encoder: Encoder) -> dict[str, Any]:
    """What identifies the features an encoder produces; caches refuse to mix different fingerprints."""
    return {
        "format_version": FORMAT_VERSION,
        "encoder": encoder.name,
        "feature_dim": encoder.feature_dim,
        "dtype": "float16",
        "preprocessing": encoder.spec.preprocessing(),
        "weights_hash": encoder.weights_hash,
    }


def _check_fingerprint(found: dict, wanted: dict, where: Path) -> None:
    differing = [name for name in _FINGERPRINT_FIELDS if found.get(name) != wanted.get(name)]
    if differing:
        details = "; ".join(f"{name}: cache has {found.get(name)!r}, this run {wanted.get(name)!r}"
                            for name in differing)
        raise FeatureCacheError(
            f"{where}: features were made with a different encoder setup ({details}). Refusing to mix them: "
            f"use another output folder, or delete {where.parent if where.is_file() else where} to rebuild."
        )


class FeatureCache:
    """Read access to a finished cache: `cache[image_id]`, `cache.get_batch(ids)`, `in`, `len`, `.meta`.

    The float16 rows stay memory-mapped; lookups return float32 copies.
    """

    def __init__(self, directory: Path, features: np.ndarray, index: dict[str, int], meta: dict) -> None:
        self.directory = directory
        self.features = features  # (count, feature_dim) float16, memory-mapped
        self.index = index
        self.meta = meta

    @classmethod
    def open(cls, directory: str | Path) -> FeatureCache:
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            if (directory / PARTIAL_DIR).is_dir():
                raise FeatureCacheError(
                    f"{directory}: feature extraction was interrupted before it finished; run "
                    "extract_features again with the same encoder and folder to resume it")
            raise FeatureCacheError(f"{directory}: not a feature cache ({META_FILE} not found)")
        meta = _read_json(meta_path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise FeatureCacheError(f"{meta_path}: format_version {meta.get('format_version')!r} is not "
                                    f"{FORMAT_VERSION}; rebuild the cache with this version of captioner")
        count, feature_dim = meta["count"], meta["feature_dim"]
        features_path = directory / FEATURES_FILE
        try:
            if count:
                features = np.load(features_path, mmap_mode="r", allow_pickle=False)
            else:  # numpy cannot memory-map an empty array
                features = np.load(features_path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise FeatureCacheError(f"{features_path}: cannot read features ({error})") from None
        if features.dtype != np.float16 or features.shape != (count, feature_dim):
            raise FeatureCacheError(f"{features_path}: expected float16 ({count}, {feature_dim}), found "
                                    f"{features.dtype} {features.shape}; the cache is corrupt, rebuild it")
        index = _read_json(directory / INDEX_FILE)
        if len(index) != count or sorted(index.values()) != list(range(count)):
            raise FeatureCacheError(f"{directory / INDEX_FILE}: does not map {count} images to rows "
                                    f"0..{count - 1}; the cache is corrupt, rebuild it")
        return cls(directory, features, index, meta)

    @property
    def feature_dim(self) -> int:
        return int(self.meta["feature_dim"])

    @property
    def ids(self) -> list[str]:
        """Image ids in row order."""
        return list(self.index)

    @property
    def failed(self) -> list[dict]:
        """Images that could not be loaded: [{"image_id", "path", "reason"}]."""
        return list(self.meta.get("failed", []))

    @property
    def fingerprint(self) -> dict[str, Any]:
        return {name: self.meta.get(name) for name in _FINGERPRINT_FIELDS}

    def check_encoder(self, encoder: Encoder) -> None:
        """Raise FeatureCacheError unless these features came from `encoder` (same weights, same preprocessing)."""
        _check_fingerprint(self.meta, cache_fingerprint(encoder), self.directory / META_FILE)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.index

    def _row(self, image_id: str) -> int:
        try:
            return self.index[image_id]
        except KeyError:
            failed = {entry["image_id"]: entry["reason"] for entry in self.meta.get("failed", [])}
            if image_id in failed:
                raise KeyError(f"{image_id!r}: no features; the image failed to load during extraction "
                               f"({failed[image_id]})") from None
            raise KeyError(f"{image_id!r} is not in the feature cache {self.directory} "
                           f"({len(self)} images); run extract_features on its records") from None

    def __getitem__(self, image_id: str) -> np.ndarray:
        """Features of one image: float32 (feature_dim,)."""
        return np.asarray(self.features[self._row(image_id)], dtype=np.float32)

    def get_batch(self, image_ids: Sequence[str]) -> torch.Tensor:
        """Features of several images: float32 (len(image_ids), feature_dim)."""
        rows = np.fromiter((self._row(image_id) for image_id in image_ids), dtype=np.int64, count=len(image_ids))
        return torch.from_numpy(np.asarray(self.features[rows], dtype=np.float32))

    def __repr__(self) -> str:
        return (f"FeatureCache({str(self.directory)!r}, {len(self)} images, encoder={self.meta.get('encoder')!r}, "
                f"weights_hash={self.meta.get('weights_hash')!r})")


# ------------------------------------------------------------------------------------------ extraction


def jpeg_draft_size(preprocessor: Preprocessor) -> int:
    """The side JPEGs are decoded to at least (reduced-scale decoding, `load_image(draft_size=...)`): twice
    the size the preprocessing resizes to, so the antialiased resize that follows still averages at least
    2×2 decoded pixels into each CNN pixel. Photos with a shorter side under twice this are decoded in full."""
    return 2 * max(preprocessor.input_size, preprocessor.resize_size)


class _ImageFiles(Dataset):
    """Position -> (position, uint8 pixels (3, H, W) or None, reason or None) for a list of image files.

    `__getitems__` (which DataLoader prefers for whole batches) loads a batch with `load_threads` threads:
    PIL releases the GIL while decoding and resizing, so one process can use every core for loading and
    then every core for the CNN, in turns, without the oversubscription that worker processes competing
    with the CNN's threads cause on a small CPU.
    """

    def __init__(self, paths: Sequence[str | Path], preprocessor: Preprocessor, max_pixels: int,
                 draft: bool, load_threads: int) -> None:
        self.paths = list(paths)
        self.preprocessor = preprocessor
        self.max_pixels = max_pixels
        self.draft_size = jpeg_draft_size(preprocessor) if draft else None
        self.load_threads = load_threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_image(self.paths[position], max_pixels=self.max_pixels, draft_size=self.draft_size)
        except ImageLoadError as error:
            return position, None, error.reason
        return position, self.preprocessor.to_pixels(image), None

    def __getitems__(self, positions: list[int]) -> list[tuple[int, torch.Tensor | None, str | None]]:
        if self.load_threads <= 1 or len(positions) <= 1:
            return [self[position] for position in positions]
        if self._pool is None or self._pool_pid != os.getpid():  # one pool per (worker) process
            self._pool = ThreadPoolExecutor(self.load_threads, thread_name_prefix="load_image")
            self._pool_pid = os.getpid()
        return list(self._pool.map(self.__getitem__, positions))

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True)
        self._pool = None


def _collate(samples: list[tuple[int, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    loaded = [(position, pixels) for position, pixels, _ in samples if pixels is not None]
    return {
        "indices": [position for position, _ in loaded],
        "pixels": Preprocessor.stack([pixels for _, pixels in loaded]) if loaded else None,  # (B, 3, H, W) uint8
        "failures": [(position, reason) for position, pixels, reason in samples if pixels is None],
    }


@dataclass
class ImageBatch:
    """One batch from `image_loader`."""

    indices: list[int]  # positions, in the input list, of the images that loaded
    images: torch.Tensor | None  # (len(indices), 3, H, W) normalised float32, None if none loaded
    failures: list[tuple[int, str]]  # (position, reason) of the images that did not load

    def __len__(self) -> int:
        return len(self.indices) + len(self.failures)


class ImageLoader:
    """Batches of loaded, preprocessed, normalised images; see `image_loader`. Has `len()` (batches)."""

    def __init__(self, dataset: _ImageFiles, loader: DataLoader, preprocessor: Preprocessor,
                 device: torch.device, channels_last: bool) -> None:
        self.dataset = dataset
        self.loader = loader
        self.preprocessor = preprocessor
        self.device = device
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[ImageBatch]:
        try:
            for batch in self.loader:
                images = None
                if batch["pixels"] is not None:
                    pixels = batch["pixels"].to(self.device, non_blocking=True)
                    images = self.preprocessor.normalize(pixels, channels_last=self.channels_last)
                yield ImageBatch(batch["indices"], images, batch["failures"])
        finally:
            self.dataset.close()


def image_loader(
    paths: Sequence[str | Path],
    encoder: Encoder,
    batch_size: int = 64,
    num_workers: int | None = None,
    load_threads: int | None = None,
    device: str | torch.device | None = None,
    channels_last: bool | None = None,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageLoader:
    """Load and preprocess image files in batches, in order, for `encoder`; bad files become failures.

    num_workers, load_threads: DataLoader worker processes, and threads that load one batch together.
        None chooses by device: on CPU, 0 workers and one load thread per core (max 8), so that loading
        and the CNN take turns on all cores (worker processes compete with the CNN's threads and measured
        slower: `scripts/bench/features.py --num-workers 2`); on GPU, min(8, cores) workers with one
        thread each.
    device: where the normalised batches go (default: the encoder's device).
    channels_last: give the CNN channels-last batches; None chooses it on CPU, where it is faster for
        EfficientNet-Lite0 (`scripts/bench/features.py --no-channels-last` measures the difference).
    draft: let the JPEG decoder downscale large photos while decoding, to no less than
        `jpeg_draft_size(encoder.preprocessor)`; False decodes every photo in full (slower, same pixels for
        photos under twice that size).
    max_pixels: the most pixels decoded per image (see `load_image`).
    """
    device = torch.device(device) if device is not None else encoder.device
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_workers is None:
        num_workers = 0 if device.type == "cpu" else min(8, cores)
    if load_threads is None:
        load_threads = min(8, cores) if num_workers == 0 else 1
    if channels_last is None:
        channels_last = device.type == "cpu"
    dataset = _ImageFiles(paths, encoder.preprocessor, max_pixels, draft, load_threads)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
    return ImageLoader(dataset, loader, encoder.preprocessor, device, channels_last)


class _PartialCache:
    """The in-progress part of a cache: raw float16 rows plus a log with one JSON line per batch.

    Rows are written and fsync'd before their log line, so after a crash the log never names rows that
    are not on disk; rows beyond the last complete log line are cut off on resume.
    """

    def __init__(self, directory: Path, feature_dim: int) -> None:
        self.directory = directory
        self.feature_dim = feature_dim
        self.ids: list[str] = []
        self.failed: list[dict] = []
        self._rows_file = None
        self._log_file = None

    @property
    def rows_path(self) -> Path:
        return self.directory / _PARTIAL_ROWS

    @property
    def done(self) -> set[str]:
        return set(self.ids) | {entry["image_id"] for entry in self.failed}

    @classmethod
    def resume_or_create(cls, directory: Path, fingerprint: dict, seed: FeatureCache | None) -> _PartialCache:
        partial = cls(directory, fingerprint["feature_dim"])
        fingerprint_path = directory / _PARTIAL_FINGERPRINT
        if fingerprint_path.is_file():
            _check_fingerprint(_read_json(fingerprint_path), fingerprint, fingerprint_path)
            partial._recover()
        else:
            if directory.exists():  # a crash while creating it: nothing usable inside
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
            (directory / _PARTIAL_ROWS).touch()
            (directory / _PARTIAL_LOG).touch()
            partial._open_files()
            if seed is not None and (len(seed) or seed.failed):  # extending a finished cache
                partial.append(seed.ids, np.asarray(seed.features), seed.failed)
            # Written last: a partial folder without it is discarded and rebuilt on the next run.
            _write_json_atomic(fingerprint_path, fingerprint)
            return partial
        partial._open_files()
        return partial

    @classmethod
    def load(cls, directory: Path, fingerprint: dict) -> _PartialCache:
        """What a finished (closed) partial folder holds, recovered after a crash; nothing if it was never
        completely created."""
        partial = cls(directory, fingerprint["feature_dim"])
        fingerprint_path = directory / _PARTIAL_FINGERPRINT
        if fingerprint_path.is_file():
            _check_fingerprint(_read_json(fingerprint_path), fingerprint, fingerprint_path)
            partial._recover()
        return partial

    def _recover(self) -> None:
        row_bytes = self.feature_dim * 2
        rows_on_disk = self.rows_path.stat().st_size // row_bytes
        good_lines: list[str] = []
        ids: list[str] = []
        failed: list[dict] = []
        with open(self.directory / _PARTIAL_LOG, encoding="utf-8") as log:
            for line in log:
                try:
                    entry = json.loads(line)
                    batch_ids, batch_failed = list(entry["ids"]), list(entry["failed"])
                except (ValueError, KeyError, TypeError):
                    break  # a line cut short by the interruption: it and anything after are dropped
                if not line.endswith("\n") or len(ids) + len(batch_ids) > rows_on_disk:
                    break
                good_lines.append(line)
                ids.extend(batch_ids)
                failed.extend(batch_failed)
        self.ids, self.failed = ids, failed
        with open(self.rows_path, "r+b") as rows:
            rows.truncate(len(ids) * row_bytes)
            os.fsync(rows.fileno())
        _write_text_atomic(self.directory / _PARTIAL_LOG, "".join(good_lines))

    def _open_files(self) -> None:
        # Kept open across batches; closed in close().
        self._rows_file = open(self.rows_path, "ab")
        self._log_file = open(self.directory / _PARTIAL_LOG, "a", encoding="utf-8")

    def append(self, ids: list[str], rows: np.ndarray, failed: list[dict]) -> None:
        """One batch: rows (len(ids), feature_dim) float16, then its log line; both fsync'd."""
        assert rows.shape == (len(ids), self.feature_dim) and rows.dtype == np.float16
        if len(ids):
            self._rows_file.write(np.ascontiguousarray(rows).tobytes())
            self._rows_file.flush()
            os.fsync(self._rows_file.fileno())
        self._log_file.write(json.dumps({"ids": ids, "failed": failed}) + "\n")
        self._log_file.flush()
        os.fsync(self._log_file.fileno())
        self.ids.extend(ids)
        self.failed.extend(failed)

    def close(self) -> None:
        for file in (self._rows_file, self._log_file):
            if file is not None:
                file.close()
        self._rows_file = self._log_file = None

    def read_rows(self) -> np.ndarray:
        if not self.ids:
            return np.zeros((0, self.feature_dim), dtype=np.float16)
        return np.memmap(self.rows_path, dtype=np.float16, mode="r", shape=(len(self.ids), self.feature_dim))


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
    if distributed.is_distributed() or any(out_dir.glob(_RANK_PARTIAL_GLOB)):
        return _extract_sharded(wanted, encoder, out_dir, fingerprint, **options)

    partial_dir = out_dir / PARTIAL_DIR
    existing: FeatureCache | None = None
    if (out_dir / META_FILE).is_file():
        existing = FeatureCache.open(out_dir)
        _check_fingerprint(existing.meta, fingerprint, out_dir / META_FILE)
        known = set(existing.index) | {entry["image_id"] for entry in existing.failed}
        if not partial_dir.exists() and all(image_id in known for image_id in wanted):
            return existing

    partial = _PartialCache.resume_or_create(partial_dir, fingerprint, seed=existing)
    try:
        done = partial.done
        todo = [(image_id, path) for image_id, path in wanted.items() if image_id not in done]
        _extract_into(partial, todo, encoder, len(done) + len(todo), len(done), **options)
    finally:
        partial.close()
    cache = _finish(out_dir, partial, fingerprint, encoder)
    _warn_failed(partial.failed, out_dir)
    return cache


def _extract_into(partial: _PartialCache, todo: list[tuple[str, Path]], encoder: Encoder, total: int,
                  initial: int, batch_size: int, num_workers: int | None, device: str | torch.device,
                  progress: bool, load_threads: int | None, channels_last: bool | None, draft: bool,
                  max_pixels: int) -> None:
    """Run the encoder over `todo` [(image_id, path)] in batches of `batch_size`, appending each batch."""
    if not todo:
        return
    device = torch.device(device)
    encoder.to(device)
    loader = image_loader([path for _, path in todo], encoder, batch_size=batch_size,
                          num_workers=num_workers, load_threads=load_threads, device=device,
                          channels_last=channels_last, draft=draft, max_pixels=max_pixels)
    bar = tqdm(total=total, initial=initial, unit="img", desc="features",
               disable=None if progress else True, file=sys.stderr)
    with bar, torch.inference_mode():
        for batch in loader:
            rows = np.zeros((0, encoder.feature_dim), dtype=np.float16)
            ids = [todo[position][0] for position in batch.indices]
            if batch.images is not None:
                rows = _to_float16(encoder.model(batch.images), ids)  # (B, feature_dim)
            failed = [{"image_id": todo[position][0], "path": str(todo[position][1]), "reason": reason}
                      for position, reason in batch.failures]
            partial.append(ids, rows, failed)
            bar.update(len(batch))


def _warn_failed(failed: list[dict], out_dir: Path) -> None:
    if failed:
        shown = "\n  ".join(f"{entry['path']}: {entry['reason']}" for entry in failed[:10])
        more = f"\n  ... and {len(failed) - 10} more" if len(failed) > 10 else ""
        warnings.warn(f"{len(failed)} image(s) could not be loaded and have no features "
                      f"(listed in {out_dir / META_FILE}):\n  {shown}{more}", stacklevel=3)


def _extract_sharded(wanted: dict[str, Path], encoder: Encoder, out_dir: Path, fingerprint: dict,
                     batch_size: int, progress: bool, **options: Any) -> FeatureCache:
    """extract_features over the ranks of a torchrun group (also used, with one rank, to finish the
    partial folders an interrupted sharded run left). Every rank returns the merged cache."""
    world, rank = distributed.world_size(), distributed.rank()
    existing: FeatureCache | None = None
    if (out_dir / META_FILE).is_file():
        existing = FeatureCache.open(out_dir)
        _check_fingerprint(existing.meta, fingerprint, out_dir / META_FILE)
    known = (set(existing.index) | {entry["image_id"] for entry in existing.failed}) if existing else set()
    untouched = not (out_dir / PARTIAL_DIR).exists() and not any(out_dir.glob(_RANK_PARTIAL_GLOB))
    distributed.barrier()  # every rank has looked before any rank writes
    if existing is not None and untouched and all(image_id in known for image_id in wanted):
        return existing

    own_dir = out_dir / (PARTIAL_DIR if rank == 0 else f"partial.rank{rank}")
    partial = _PartialCache.resume_or_create(own_dir, fingerprint, seed=existing if rank == 0 else None)
    try:
        done = set(partial.done)
        if rank == 0:  # folders of ranks this run does not have (an earlier run with more processes)
            for directory in _rank_partial_dirs(out_dir):
                if _rank_number(directory) >= world:
                    done |= _PartialCache.load(directory, fingerprint).done
        done = set().union(known, *distributed.all_gather_object(done))
        todo = [(image_id, path) for image_id, path in wanted.items() if image_id not in done]
        mine = [todo[position] for position in distributed.shard_batches(len(todo), batch_size)]
        _extract_into(partial, mine, encoder, len(mine), 0, batch_size=batch_size,
                      progress=progress and rank == 0, **options)
    finally:
        partial.close()
    distributed.barrier()  # every shard is on disk
    if rank == 0:
        failed = _merge_partials(out_dir, wanted, existing, fingerprint, encoder)
        _warn_failed(failed, out_dir)
    distributed.barrier()
    return FeatureCache.open(out_dir)


def _rank_partial_dirs(out_dir: Path) -> list[Path]:
    return sorted((d for d in out_dir.glob(_RANK_PARTIAL_GLOB) if d.name[len("partial.rank"):].isdigit()),
                  key=_rank_number)


def _rank_number(directory: Path) -> int:
    return int(directory.name[len("partial.rank"):])


def _merge_partials(out_dir: Path, wanted: dict[str, Path], existing: FeatureCache | None, fingerprint: dict,
                    encoder: Encoder) -> list[dict]:
    """Rank 0: write one cache from `partial/` and every `partial.rank<k>/`, in the order a single process
    would have written it (the cache being extended first, then the input order); returns the failures."""
    directories = [out_dir / PARTIAL_DIR, *_rank_partial_dirs(out_dir)]
    partials = [_PartialCache.load(directory, fingerprint) for directory in directories]
    where: dict[str, tuple[int, int]] = {}  # image_id -> (partial, row)
    failed_by_id: dict[str, dict] = {}
    for number, partial in enumerate(partials):
        for row, image_id in enumerate(partial.ids):
            where.setdefault(image_id, (number, row))
        for entry in partial.failed:
            failed_by_id.setdefault(entry["image_id"], entry)
    first = existing.ids if existing else []
    ids = list(dict.fromkeys([*first, *(i for i in wanted if i in where), *where]))
    failed_order = [e["image_id"] for e in existing.failed] if existing else []
    failed_ids = dict.fromkeys([*failed_order, *(i for i in wanted if i in failed_by_id), *failed_by_id])
    failed = [failed_by_id[i] for i in failed_ids if i not in where]
    rows = np.empty((len(ids), encoder.feature_dim), dtype=np.float16)
    for number, partial in enumerate(partials):
        targets = [(position, where[image_id][1]) for position, image_id in enumerate(ids)
                   if where[image_id][0] == number]
        if targets:
            source = partial.read_rows()
            rows[[t for t, _ in targets]] = source[[s for _, s in targets]]
    _write_cache(out_dir, rows, ids, failed, fingerprint, encoder)
    for directory in directories:
        if directory.exists():
            shutil.rmtree(directory)
    return failed


def _to_float16(features: torch.Tensor, ids: list[str]) -> np.ndarray:
    rows = features.float().cpu().numpy().astype(np.float16)
    if not np.isfinite(rows).all():
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(rows).all(axis=1))[:5]]
        raise FeatureCacheError(f"features of {bad} are not finite in float16 (overflow or NaN); "
                                "this encoder's outputs do not fit a float16 cache")
    return rows


def _finish(out_dir: Path, partial: _PartialCache, fingerprint: dict, encoder: Encoder) -> FeatureCache:
    """Write the cache from partial/, then drop partial/."""
    _write_cache(out_dir, partial.read_rows(), partial.ids, partial.failed, fingerprint, encoder)
    shutil.rmtree(partial.directory)
    return FeatureCache.open(out_dir)


def _write_cache(out_dir: Path, rows: np.ndarray, ids: list[str], failed: list[dict], fingerprint: dict,
                 encoder: Encoder) -> None:
    """Write features.f16.npy, index.json and meta.json (last) atomically."""
    (out_dir / META_FILE).unlink(missing_ok=True)  # the cache is unfinished until the new meta.json lands
    temporary = out_dir / (FEATURES_FILE + ".tmp")
    with open(temporary, "wb") as file:
        np.lib.format.write_array(file, rows, allow_pickle=False)
        file.flush()
        os.fsync(file.fileno())
    del rows
    os.replace(temporary, out_dir / FEATURES_FILE)
    _write_json_atomic(out_dir / INDEX_FILE, {image_id: row for row, image_id in enumerate(ids)})
    meta = {
        **fingerprint,
        "count": len(ids),
        "failed": failed,
        "weights_source": encoder.weights_source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    _write_json_atomic(out_dir / META_FILE, meta)
    _fsync_directory(out_dir)


# ------------------------------------------------------------------------------------------- in memory


def features_for_images(encoder: Encoder, images: Iterable[Image.Image | str | Path | bytes],
                        batch_size: int = 64, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Features of in-memory images (or paths / encoded bytes): float32 (N, feature_dim).

    Values are rounded through float16, exactly as a cache stores them, so a caption computed from a
    photo matches the one computed from its cached features. Raises ImageLoadError for a bad image.
    """
    preprocessor = encoder.preprocessor
    draft_size = jpeg_draft_size(preprocessor)
    pixels = [preprocessor.to_pixels(load_image(image, max_pixels=max_pixels, draft_size=draft_size))
              for image in images]
    if not pixels:
        return torch.zeros((0, encoder.feature_dim), dtype=torch.float32)
    channels_last = encoder.device.type == "cpu"
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            batch = Preprocessor.stack(pixels[start:start + batch_size]).to(encoder.device)
            images_in = preprocessor.normalize(batch, channels_last=channels_last)
            outputs.append(encode_images(encoder, images_in))
    return torch.cat(outputs)


def encode_images(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, H, W) -> float32 features (B, D), rounded through float16 exactly as a
    cache stores them, so a caption computed from a photo matches one computed from its cached row."""
    with torch.inference_mode():
        return encoder.model(images).float().cpu().to(torch.float16).to(torch.float32)


def compute_features(
    paths: Sequence[str | Path],
    encoder: Encoder,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """Features of image files without a cache: float32 (number loaded, feature_dim), in input order with
    the failures left out, and [(position, reason)] for the files that did not load. Values are rounded
    through float16 like a cache's."""
    if device is not None:
        encoder.to(device)
    loader = image_loader(paths, encoder, batch_size=batch_size, num_workers=num_workers, max_pixels=max_pixels)
    outputs: list[torch.Tensor] = []
    failures: list[tuple[int, str]] = []
    bar = tqdm(total=len(paths), unit="img", desc="features", disable=None if progress else True, file=sys.stderr)
    with bar, torch.inference_mode():
        for batch in loader:
            failures.extend(batch.failures)
            if batch.images is not None:
                outputs.append(encode_images(encoder, batch.images))
            bar.update(len(batch))
    if not outputs:
        return torch.zeros((0, encoder.feature_dim), dtype=torch.float32), failures
    return torch.cat(outputs), failures


# ------------------------------------------------------------------------------------------- file helpers


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise FeatureCacheError(f"{path}: missing; the cache is incomplete or corrupt") from None
    except ValueError as error:
        raise FeatureCacheError(f"{path}: not valid JSON ({error}); the cache is corrupt") from None


def _write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _write_json_atomic(path: Path, data: Any) -> None:
    _write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
