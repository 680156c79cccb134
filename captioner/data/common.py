"""What the caption-file readers share: problem reporting (raise, or skip and list with `skip_invalid`),
finding image files, the pending-record step, and checked file reading."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.data.records import CaptionRecord, DataFormatError, LoadReport
from captioner.text import TOKEN_RE, tokenize

PathLike = str | os.PathLike
# Where image folders usually sit beside the annotation files ("Flicker8k_Dataset" is the release's spelling).
IMAGE_FOLDER_NAMES = ("images", "Flicker8k_Dataset", "Flickr8k_Dataset")
# Real COCO keeps images in train2014/ and val2014/ under the images root.
COCO_SUBFOLDERS = ("train2014", "val2014")
# The most words (tokens) a reference caption may have: COCO's and Flickr8k's longest have about 50.
MAX_CAPTION_WORDS = 100
SKIP_HINT = (" (or skip such entries: --skip-invalid on the command line, skip_invalid=True in Python; they are "
              "listed in Dataset.report)")




class Problems:
    """Raises on the first problem, or (skip_invalid) records each one in the report."""

    def __init__(self, skip_invalid: bool, report: LoadReport):
        self.skip_invalid = skip_invalid
        self.report = report

    def __call__(self, message: str) -> None:
        if not self.skip_invalid:
            raise DataFormatError(message + SKIP_HINT)
        self.report.add(message)


class ImageFinder:
    """Finds image files under a root with one directory listing per folder, not one stat per file."""

    def __init__(self, root: Path):
        if not root.is_dir():
            raise FileNotFoundError(f"images folder {root} does not exist; point --images (images_dir= in "
                                    "Python) at the folder that holds the images")
        self.root = root.absolute()  # records stay valid if the working directory changes
        self._listings: dict[str, frozenset[str]] = {}

    def _names(self, folder: str) -> frozenset[str]:
        if folder not in self._listings:
            try:
                with os.scandir(self.root / folder) as entries:
                    self._listings[folder] = frozenset(e.name for e in entries if e.is_file())
            except (FileNotFoundError, NotADirectoryError):
                self._listings[folder] = frozenset()
        return self._listings[folder]

    def find(self, candidates: Sequence[str]) -> str | None:
        """The first candidate path (relative to the root, '/'-separated) that is an existing file."""
        for relative in candidates:
            relative = posixpath.normpath(relative)
            folder, name = posixpath.split(relative)
            if name in self._names(folder):
                return relative
        return None


@dataclass
class Pending:
    """An image whose captions passed the checks; its file is looked up in `finish_records`."""

    where: str  # "file: entry", for messages
    candidates: list[str]  # possible paths relative to the images root, in order of preference
    captions: list[str]
    split: str
    source_id: int | str | None


def finish_records(pending: list[Pending], finder: ImageFinder, problems: Problems) -> list[CaptionRecord]:
    """Resolve image files and reject duplicate image ids (relative paths)."""
    records: list[CaptionRecord] = []
    first_seen: dict[str, str] = {}
    for item in pending:
        image_id = finder.find(item.candidates)
        if image_id is None:
            looked_for = " or ".join(dict.fromkeys(item.candidates))
            problems(f"{item.where}: image file not found (looked for {looked_for} in {finder.root}); "
                     "point --images (images_dir= in Python) at the folder that holds the images")
            continue
        if image_id in first_seen:
            problems(f"{item.where}: image {image_id} is listed twice (also {first_seen[image_id]}); "
                     "remove one of the two entries")
            continue
        first_seen[image_id] = item.where
        records.append(CaptionRecord(image_id=image_id, image_path=finder.root / image_id,
                                     captions=item.captions, split=item.split, source_id=item.source_id))
    return records


def default_images_dir(folder: Path) -> Path:
    for name in IMAGE_FOLDER_NAMES:
        if (folder / name).is_dir():
            return folder / name
    return folder


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path.name}: line {error.lineno}, column {error.colno}: invalid JSON: "
                              f"{error.msg}") from None
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path.name}: byte {error.start}: not UTF-8 text") from None


def read_text(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path.name}: byte {error.start}: not UTF-8 text") from None


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}")


def caption_problem(caption: str, entry: str = "entry") -> str | None:
    """Why a reference caption cannot be used, or None. The one rule for every reader, so that training and
    evaluation see the same references: a caption needs a word that `tokenize` keeps (letters a-z or
    digits: an empty or punctuation-only caption trains nothing and would be scored as an empty reference),
    and at most MAX_CAPTION_WORDS of them (a pasted document as a caption moves CIDEr-D by points)."""
    lowered = caption.lower()
    if not caption.strip():
        return f"empty caption; fill it in or remove the {entry}"
    if not TOKEN_RE.search(lowered):
        return f"caption {shorten(caption)!r} has no words (only punctuation or letters outside a-z); fill it in " \
               f"or remove the {entry}"
    # a token takes at least one character and a separator, so only long texts can hold too many
    if len(lowered) > 2 * MAX_CAPTION_WORDS and (words := len(tokenize(caption))) > MAX_CAPTION_WORDS:
        return f"caption {shorten(caption)!r} has {words} words, more than the {MAX_CAPTION_WORDS} a reference " \
               f"caption may have; shorten it or remove the {entry}"
    return None


def shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_caption(caption: Any, where: str, key: str, problems: Problems) -> str | None:
    """The stripped caption, or None after reporting why it is unusable (`caption_problem`)."""
    if not isinstance(caption, str):
        problems(f"{where}: '{key}' must be a string, found {type_name(caption)}")
        return None
    problem = caption_problem(caption)
    if problem is not None:
        problems(f"{where}: {problem}")
        return None
    return caption.strip()


def top_level_list(data: Any, path: Path, key: str, expected: str) -> list:
    if not isinstance(data, dict):
        raise DataFormatError(f"{path.name}: the top level is {type_name(data)}; expected {expected}")
    if key not in data:
        raise DataFormatError(f"{path.name}: missing key '{key}' at the top level; expected {expected}")
    if not isinstance(data[key], list):
        raise DataFormatError(f"{path.name}: '{key}' is {type_name(data[key])}; it must be a list")
    return data[key]
