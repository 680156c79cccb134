"""The one record type every dataset reader produces, and the `Dataset` that holds a source's records."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")
# Every split name a data file may use -> the three we use. Karpathy's "restval" is extra train data.
SPLIT_ALIASES = {
    "train": "train", "restval": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test",
}


@dataclass
class CaptionRecord:
    """One image and its reference captions.

    image_id: the stable key used by caches and reports: the image's path relative to the image root,
        e.g. "1000268201_693b08cb0e.jpg" or "val2014/COCO_val2014_000000000042.jpg".
    source_id: the id the annotation file gives the image (COCO / Karpathy numeric id), or None.
    """

    image_id: str
    image_path: Path
    captions: list[str]
    split: str
    source_id: int | str | None = None


class DataFormatError(ValueError):
    """A problem in a data file; the message names the file, the entry and the problem."""


@dataclass
class LoadReport:
    """What a reader skipped when asked to continue past invalid entries (`skip_invalid=True`)."""

    problems: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.problems.append(message)

    def __bool__(self) -> bool:
        return bool(self.problems)

    def summary(self) -> str:
        if not self.problems:
            return "no problems"
        shown = "\n  ".join(self.problems[:10])
        more = f"\n  ... and {len(self.problems) - 10} more" if len(self.problems) > 10 else ""
        return f"{len(self.problems)} invalid entries skipped:\n  {shown}{more}"


@dataclass
class Dataset:
    """Caption records from one source, what was skipped reading them, and where they came from."""

    records: list[CaptionRecord]
    report: LoadReport = field(default_factory=LoadReport)
    source: str = ""

    def split(self, name: str) -> list[CaptionRecord]:
        """Records of one split; "dev" and "restval" are accepted as their normalised names."""
        normalised = SPLIT_ALIASES.get(name)
        if normalised is None:
            raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return [record for record in self.records if record.split == normalised]

    def require_split(self, name: str, split_flag: str | None = None, advice: str | None = None) -> list[CaptionRecord]:
        """`split(name)`, refusing an empty one with a message that says which splits the source has (and,
        through `source`, how a reader chose them: e.g. a COCO file whose name names no split is all test).
        The caller's `split_flag` (a command's option choosing the split), when it has one, is suggested
        with the split the source does have; `advice` is said otherwise."""
        records = self.split(name)
        if not records:
            counts = Counter(record.split for record in self.records)
            has = ", ".join(f"{split} ({counts[split]} images)" for split in SPLITS if counts[split]) or "no images"
            if split_flag and counts:
                advice = f"use {split_flag} {' or '.join(split for split in SPLITS if counts[split])}"
            raise ValueError(f"{self.source or 'the dataset'}: no {name!r} images; it has {has}"
                             + (f"; {advice}" if advice else ""))
        return records

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[CaptionRecord]:
        return iter(self.records)

    def fingerprint(self) -> str:
        """Short sha256 of the content (image ids, splits, captions), independent of order and layout."""
        content = sorted([r.image_id, r.split, sorted(r.captions)] for r in self.records)
        payload = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(payload).hexdigest()[:16]

