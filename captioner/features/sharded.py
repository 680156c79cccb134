"""The per-rank partial folders of a sharded `extract_features` run, and their merge into one cache.

Under torchrun the images are cut into batches of `batch_size` and batch b goes to rank b % W; rank 0 appends to
`partial/`, rank k to `partial.rank<k>/` (each resumable on its own), and rank 0 then merges them into one
cache identical to a single-process run's: the same index order (the input order), the same float16
bytes, because every batch holds the images a single process would have put in it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from captioner.encoders.registry import Encoder
from captioner.features.cache import (
    PARTIAL_DIR,
    RANK_PARTIAL_GLOB,
    FeatureCache,
    PartialCache,
    write_cache,
)


def rank_partial_dirs(out_dir: Path) -> list[Path]:
    return sorted((d for d in out_dir.glob(RANK_PARTIAL_GLOB) if d.name[len("partial.rank"):].isdigit()),
                  key=rank_number)


def rank_number(directory: Path) -> int:
    return int(directory.name[len("partial.rank"):])


def merge_partials(out_dir: Path, wanted: dict[str, Path], existing: FeatureCache | None, fingerprint: dict,
                    encoder: Encoder) -> list[dict]:
    """Rank 0: write one cache from `partial/` and every `partial.rank<k>/`, in the order a single process
    would have written it (the cache being extended first, then the input order); returns the failures."""
    directories = [out_dir / PARTIAL_DIR, *rank_partial_dirs(out_dir)]
    partials = [PartialCache.load(directory, fingerprint) for directory in directories]
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
    write_cache(out_dir, rows, ids, failed, fingerprint, encoder)
    for directory in directories:
        if directory.exists():
            shutil.rmtree(directory)
    return failed
