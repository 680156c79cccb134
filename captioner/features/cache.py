"""The feature cache format: pooled CNN features of many images in a compact, resumable folder.

A finished cache is a folder with three files:

    features.f16.npy   float16 rows (count, feature_dim), one per image, in index order
    index.json         {image_id: row} in row order
    meta.json          encoder, feature_dim, preprocessing, weights hash, count, failed images, format version

meta.json is written last, so a folder without it is not a finished cache. While extraction runs
(`captioner.features.extract`), batches are appended to `partial/` (raw float16 rows + one JSON line per
batch, each fsync'd; `PartialCache`), so an interrupted run picks up after the last batch that reached the
disk. A cache (finished or partial) made with another encoder, other weights or other preprocessing is
refused rather than mixed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner.encoders.identity import cnn_mismatch
from captioner.encoders.registry import Encoder
from captioner.utils import atomic_replace, check_output_folder, write_text_atomic

FORMAT_VERSION = 1
FEATURES_FILE = "features.f16.npy"
INDEX_FILE = "index.json"
META_FILE = "meta.json"
PARTIAL_DIR = "partial"
RANK_PARTIAL_GLOB = "partial.rank*"  # rank k > 0 of a sharded run: partial.rank<k>
PARTIAL_ROWS = "features.f16.bin"
PARTIAL_LOG = "batches.jsonl"
PARTIAL_FINGERPRINT = "fingerprint.json"
# Fields that must agree for two sets of features to be mixed in one cache: the CNN's identity
# (`captioner.encoders.identity`: encoder and weights_hash), and the features' format.
FINGERPRINT_FIELDS = ("format_version", "encoder", "feature_dim", "dtype", "preprocessing", "weights_hash")
FORMAT_FIELDS = ("format_version", "feature_dim", "dtype", "preprocessing")


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


def check_fingerprint(found: dict, wanted: dict, where: Path) -> None:
    differing = cnn_mismatch(found, wanted) + [name for name in FORMAT_FIELDS if found.get(name) != wanted.get(name)]
    if differing:
        details = "; ".join(f"{name}: cache has {found.get(name)!r}, this run {wanted.get(name)!r}"
                            for name in differing)
        raise FeatureCacheError(
            f"{where}: features were made with a different encoder setup ({details}). Refusing to mix them: "
            f"use another output folder, or replace the cache in {where.parent if where.is_file() else where} "
            "(captioner features --overwrite)"
        )


CACHE_FILES = (META_FILE, FEATURES_FILE, INDEX_FILE)


def cache_contents(directory: str | Path) -> list[str]:
    """What of a feature cache, finished or in progress, `directory` holds (file and folder names)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [name for name in CACHE_FILES if (directory / name).exists()]
    return found + sorted(path.name for path in (directory / PARTIAL_DIR, *directory.glob(RANK_PARTIAL_GLOB))
                          if path.is_dir())


def check_cache_folder(directory: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write features into a folder holding a cache (finished, or interrupted) unless asked:
    `resume` continues or extends it, `overwrite` replaces it."""
    directory = Path(directory)
    check_output_folder(directory, resume, overwrite, "feature cache", FeatureCacheError)
    found = cache_contents(directory)
    if found and not (resume or overwrite):
        what = "a feature cache" if META_FILE in found else "an interrupted feature extraction"
        raise FeatureCacheError(f"{directory}: holds {what} ({', '.join(found)}); continue or extend it with "
                                "--resume, replace it with --overwrite, or give another --out")


def clear_cache_folder(directory: str | Path) -> list[str]:
    """Remove a feature cache (finished and in progress) from `directory`; anything else there stays."""
    directory = Path(directory)
    found = cache_contents(directory)
    for name in found:
        path = directory / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in CACHE_FILES:
        for stale in directory.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    return found


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
                    f"{directory}: feature extraction was interrupted before it finished; continue it with "
                    "`captioner features --resume` (the same data, encoder and --out), or extract_features in "
                    "Python with the same encoder and folder")
            raise FeatureCacheError(f"{directory}: not a feature cache ({META_FILE} not found)")
        meta = read_json(meta_path)
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
        index = read_json(directory / INDEX_FILE)
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
        return {name: self.meta.get(name) for name in FINGERPRINT_FIELDS}

    def check_encoder(self, encoder: Encoder) -> None:
        """Raise FeatureCacheError unless these features came from `encoder` (same weights, same preprocessing)."""
        check_fingerprint(self.meta, cache_fingerprint(encoder), self.directory / META_FILE)

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



class PartialCache:
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
        return self.directory / PARTIAL_ROWS

    @property
    def done(self) -> set[str]:
        return set(self.ids) | {entry["image_id"] for entry in self.failed}

    @classmethod
    def resume_or_create(cls, directory: Path, fingerprint: dict, seed: FeatureCache | None) -> PartialCache:
        partial = cls(directory, fingerprint["feature_dim"])
        fingerprint_path = directory / PARTIAL_FINGERPRINT
        if fingerprint_path.is_file():
            check_fingerprint(read_json(fingerprint_path), fingerprint, fingerprint_path)
            partial._recover()
        else:
            if directory.exists():  # a crash while creating it: nothing usable inside
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
            (directory / PARTIAL_ROWS).touch()
            (directory / PARTIAL_LOG).touch()
            partial._open_files()
            if seed is not None and (len(seed) or seed.failed):  # extending a finished cache
                partial.append(seed.ids, np.asarray(seed.features), seed.failed)
            # Written last: a partial folder without it is discarded and rebuilt on the next run.
            write_json_atomic(fingerprint_path, fingerprint)
            return partial
        partial._open_files()
        return partial

    @classmethod
    def load(cls, directory: Path, fingerprint: dict) -> PartialCache:
        """What a finished (closed) partial folder holds, recovered after a crash; nothing if it was never
        completely created."""
        partial = cls(directory, fingerprint["feature_dim"])
        fingerprint_path = directory / PARTIAL_FINGERPRINT
        if fingerprint_path.is_file():
            check_fingerprint(read_json(fingerprint_path), fingerprint, fingerprint_path)
            partial._recover()
        return partial

    def _recover(self) -> None:
        row_bytes = self.feature_dim * 2
        rows_on_disk = self.rows_path.stat().st_size // row_bytes
        good_lines: list[str] = []
        ids: list[str] = []
        failed: list[dict] = []
        with open(self.directory / PARTIAL_LOG, encoding="utf-8") as log:
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
        write_text_atomic(self.directory / PARTIAL_LOG, "".join(good_lines))

    def _open_files(self) -> None:
        # Kept open across batches; closed in close().
        self._rows_file = open(self.rows_path, "ab")
        self._log_file = open(self.directory / PARTIAL_LOG, "a", encoding="utf-8")

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



def to_float16(features: torch.Tensor, ids: list[str]) -> np.ndarray:
    rows = features.float().cpu().numpy().astype(np.float16)
    if not np.isfinite(rows).all():
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(rows).all(axis=1))[:5]]
        raise FeatureCacheError(f"features of {bad} are not finite in float16 (overflow or NaN); "
                                "this encoder's outputs do not fit a float16 cache")
    return rows


def finish_cache(out_dir: Path, partial: PartialCache, fingerprint: dict, encoder: Encoder) -> FeatureCache:
    """Write the cache from partial/, then drop partial/."""
    write_cache(out_dir, partial.read_rows(), partial.ids, partial.failed, fingerprint, encoder)
    shutil.rmtree(partial.directory)
    return FeatureCache.open(out_dir)


def write_cache(out_dir: Path, rows: np.ndarray, ids: list[str], failed: list[dict], fingerprint: dict,
                 encoder: Encoder) -> None:
    """Write features.f16.npy, index.json and meta.json (last) atomically."""
    (out_dir / META_FILE).unlink(missing_ok=True)  # the cache is unfinished until the new meta.json lands
    with atomic_replace(out_dir / FEATURES_FILE) as temporary, open(temporary, "wb") as file:
        np.lib.format.write_array(file, rows, allow_pickle=False)
    del rows
    write_json_atomic(out_dir / INDEX_FILE, {image_id: row for row, image_id in enumerate(ids)})
    meta = {
        **fingerprint,
        "count": len(ids),
        "failed": failed,
        "weights_source": encoder.weights_source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    write_json_atomic(out_dir / META_FILE, meta)
    fsync_directory(out_dir)



def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise FeatureCacheError(f"{path}: missing; the cache is incomplete or corrupt") from None
    except ValueError as error:
        raise FeatureCacheError(f"{path}: not valid JSON ({error}); the cache is corrupt") from None


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
