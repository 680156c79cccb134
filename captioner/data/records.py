"""The one record type every dataset reader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


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
