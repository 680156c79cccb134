"""Readers for the three caption-file layouts -> one `Dataset` of `CaptionRecord`s.

- `read_coco`: MS-COCO caption json (one file or several), split from the file name or a Karpathy file.
- `read_karpathy`: Karpathy's `dataset_*.json` (`images[].sentences[].raw`).
- `read_flickr8k`: the original Flickr8k release (`Flickr8k.token.txt` + `Flickr_8k.*Images.txt`).
- `load_dataset`: picks one of them for a file or a folder.

Every reader checks what it reads. A problem raises `DataFormatError` naming the file, the entry and
the problem; with `skip_invalid=True` the offending caption or image is dropped instead and the problem
is listed in `Dataset.report`. Captions keep their text, minus leading/trailing whitespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.data.records import SPLITS, CaptionRecord, DataFormatError, LoadReport

PathLike = str | os.PathLike

# Every split name a data file may use -> the three we use. Karpathy's "restval" is extra train data.
SPLIT_ALIASES = {
    "train": "train", "restval": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test",
}
LAYOUTS = ("karpathy", "coco", "flickr8k")
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# Where image folders usually sit beside the annotation files ("Flicker8k_Dataset" is the release's spelling).
_IMAGE_FOLDER_NAMES = ("images", "Flicker8k_Dataset", "Flickr8k_Dataset")
# Real COCO keeps images in train2014/ and val2014/ under the images root.
_COCO_SUBFOLDERS = ("train2014", "val2014")
_SKIP_HINT = (" (or skip such entries: --skip-invalid on the command line, skip_invalid=True in Python; they are "
              "listed in Dataset.report)")


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

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[CaptionRecord]:
        return iter(self.records)

    def fingerprint(self) -> str:
        """Short sha256 of the content (image ids, splits, captions), independent of order and layout."""
        content = sorted([r.image_id, r.split, sorted(r.captions)] for r in self.records)
        payload = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(payload).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# Shared machinery


class _Problems:
    """Raises on the first problem, or (skip_invalid) records each one in the report."""

    def __init__(self, skip_invalid: bool, report: LoadReport):
        self.skip_invalid = skip_invalid
        self.report = report

    def __call__(self, message: str) -> None:
        if not self.skip_invalid:
            raise DataFormatError(message + _SKIP_HINT)
        self.report.add(message)


class _ImageFinder:
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
class _Pending:
    """An image whose captions passed the checks; its file is looked up in `_finish`."""

    where: str  # "file: entry", for messages
    candidates: list[str]  # possible paths relative to the images root, in order of preference
    captions: list[str]
    split: str
    source_id: int | str | None


def _finish(pending: list[_Pending], finder: _ImageFinder, problems: _Problems) -> list[CaptionRecord]:
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


def _default_images_dir(folder: Path) -> Path:
    for name in _IMAGE_FOLDER_NAMES:
        if (folder / name).is_dir():
            return folder / name
    return folder


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path.name}: line {error.lineno}, column {error.colno}: invalid JSON: "
                              f"{error.msg}") from None
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path.name}: byte {error.start}: not UTF-8 text") from None


def _read_text(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path.name}: byte {error.start}: not UTF-8 text") from None


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}")


def _check_caption(caption: Any, where: str, key: str, problems: _Problems) -> str | None:
    """The stripped caption, or None after reporting why it is unusable."""
    if not isinstance(caption, str):
        problems(f"{where}: '{key}' must be a string, found {_type_name(caption)}")
        return None
    if not caption.strip():
        problems(f"{where}: empty caption; fill it in or remove the entry")
        return None
    return caption.strip()


def _top_level_list(data: Any, path: Path, key: str, expected: str) -> list:
    if not isinstance(data, dict):
        raise DataFormatError(f"{path.name}: the top level is {_type_name(data)}; expected {expected}")
    if key not in data:
        raise DataFormatError(f"{path.name}: missing key '{key}' at the top level; expected {expected}")
    if not isinstance(data[key], list):
        raise DataFormatError(f"{path.name}: '{key}' is {_type_name(data[key])}; it must be a list")
    return data[key]


# --------------------------------------------------------------------------------------------------------
# Karpathy


def read_karpathy(json_path: PathLike, images_dir: PathLike | None = None,
                  skip_invalid: bool = False) -> Dataset:
    """Read a Karpathy-split file (`dataset_flickr8k.json`, `dataset_coco.json`, ...).

    `images_dir` defaults to the json's folder / "images" when that exists, else the json's folder
    (where COCO's `filepath` folders, train2014/ and val2014/, sit). Each image is looked for at
    `filepath/filename`, then `filename`, under it.
    """
    path = _require_file(Path(json_path), "Karpathy split file")
    return _read_karpathy(path, _load_json(path), images_dir, skip_invalid)


def _read_karpathy(path: Path, data: Any, images_dir: PathLike | None, skip_invalid: bool) -> Dataset:
    images = _top_level_list(data, path, "images", 'an object with an "images" list (Karpathy format)')
    finder = _ImageFinder(Path(images_dir) if images_dir is not None else _default_images_dir(path.parent))
    report = LoadReport()
    problems = _Problems(skip_invalid, report)
    pending: list[_Pending] = []
    first_index_of_id: dict[int | str, int] = {}
    for index, entry in enumerate(images):
        parsed = _karpathy_entry(path, index, entry, problems)
        if parsed is None:
            continue
        where, filename, filepath, split = parsed
        image_number = entry.get("imgid")
        if image_number is not None:
            if not _is_id(image_number):
                problems(f"{where}: 'imgid' must be an integer, found {image_number!r}")
                continue
            if image_number in first_index_of_id:
                problems(f"{where}: duplicate imgid {image_number} (also images[{first_index_of_id[image_number]}]); "
                         "give every image its own imgid")
                continue
            first_index_of_id[image_number] = index
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            problems(f"{where}: " + ("missing key 'sentences'" if sentences is None
                                     else f"'sentences' must be a list, found {_type_name(sentences)}"))
            continue
        captions = []
        for number, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if isinstance(raw, str) and raw.strip():  # the common case, checked without building messages
                captions.append(raw.strip())
                continue
            sentence_where = f"{where}: sentences[{number}]"
            if not isinstance(sentence, dict):
                problems(f"{sentence_where}: expected an object with a 'raw' caption, found {_type_name(sentence)}")
            elif "raw" not in sentence:
                problems(f"{sentence_where}: missing key 'raw'")
            elif (caption := _check_caption(sentence["raw"], sentence_where, "raw", problems)) is not None:
                captions.append(caption)
        if not captions:
            problems(f"{where}: image has no captions" + (" left" if sentences else "") +
                     "; add sentences or remove the image")
            continue
        source_id = entry.get("cocoid", image_number)
        candidates = [posixpath.join(filepath, filename), filename] if filepath else [filename]
        pending.append(_Pending(where, candidates, captions, split, source_id))
    records = _finish(pending, finder, problems)
    return Dataset(records, report, f"karpathy {path} (images in {finder.root})")


def _karpathy_entry(path: Path, index: int, entry: Any,
                    problems: _Problems) -> tuple[str, str, str, str] | None:
    """(where, filename, filepath, normalised split) of one images[] entry, or None if it is unusable."""
    where = f"{path.name}: images[{index}]"
    if not isinstance(entry, dict):
        problems(f"{where}: expected an object, found {_type_name(entry)}")
        return None
    filename = entry.get("filename")
    if "imgid" in entry:
        where += f" (imgid {entry['imgid']}" + (f", {filename!r})" if isinstance(filename, str) else ")")
    elif isinstance(filename, str):
        where += f" ({filename!r})"
    if filename is None:
        problems(f"{where}: missing key 'filename'")
        return None
    if not isinstance(filename, str) or not filename.strip():
        problems(f"{where}: 'filename' must be a non-empty string, found {filename!r}")
        return None
    filepath = entry.get("filepath") or ""
    if not isinstance(filepath, str):
        problems(f"{where}: 'filepath' must be a string, found {filepath!r}")
        return None
    split = entry.get("split")
    if split is None:
        problems(f"{where}: missing key 'split'")
        return None
    if split not in SPLIT_ALIASES:
        problems(f"{where}: unknown split {split!r}; use one of train, val, test, restval")
        return None
    return where, filename, filepath, SPLIT_ALIASES[split]


# --------------------------------------------------------------------------------------------------------
# COCO


def read_coco(captions_json: PathLike | Sequence[PathLike], images_dir: PathLike | None = None,
              karpathy_split: PathLike | None = None, skip_invalid: bool = False) -> Dataset:
    """Read MS-COCO caption files (one path or several) through pycocotools.

    The split of each file comes from its name (train / val / dev / test), or, with `karpathy_split`
    (a Karpathy `dataset_coco.json`), per image from that file (matched on cocoid, else file name;
    restval counts as train). Images are looked for under `images_dir` at the Karpathy `filepath`,
    then `file_name`, train2014/`file_name` and val2014/`file_name`. `images_dir` defaults to the
    first file's folder / "images" when that exists, else that folder.
    """
    paths = [Path(captions_json)] if isinstance(captions_json, (str, os.PathLike)) else [Path(p) for p in captions_json]
    if not paths:
        raise ValueError("read_coco needs at least one captions json file")
    loaded = [(path, _load_json(_require_file(path, "COCO captions file"))) for path in paths]
    return _read_coco(loaded, images_dir, karpathy_split, skip_invalid)


def _read_coco(loaded: list[tuple[Path, Any]], images_dir: PathLike | None,
               karpathy_split: PathLike | None, skip_invalid: bool) -> Dataset:
    finder = _ImageFinder(Path(images_dir) if images_dir is not None else _default_images_dir(loaded[0][0].parent))
    report = LoadReport()
    problems = _Problems(skip_invalid, report)
    split_index = _KarpathySplitIndex(Path(karpathy_split), problems) if karpathy_split is not None else None
    pending: list[_Pending] = []
    for path, data in loaded:
        file_split = None if split_index is not None else _split_from_file_name(path)
        pending += _read_coco_file(path, data, file_split, split_index, problems)
    records = _finish(pending, finder, problems)
    files = ", ".join(str(path) for path, _ in loaded)
    split_note = f", splits from {karpathy_split}" if karpathy_split is not None else ""
    return Dataset(records, report, f"coco {files} (images in {finder.root}{split_note})")


def _split_from_file_name(path: Path) -> str:
    words = re.split(r"[^a-z]+", path.stem.lower())
    found = {SPLIT_ALIASES[word] for word in words if word in SPLIT_ALIASES}
    if len(found) != 1:
        raise DataFormatError(
            f"{path.name}: cannot tell the split from the file name (looked for one of train, val, dev, test "
            f"as a word in it{', found ' + ' and '.join(sorted(found)) if found else ''}); rename the file "
            "or give --karpathy-split (karpathy_split= in Python)")
    return found.pop()


class _KarpathySplitIndex:
    """Split and folder of each image in a Karpathy file, looked up by cocoid or file name."""

    def __init__(self, path: Path, problems: _Problems):
        self.path = _require_file(path, "Karpathy split file")
        images = _top_level_list(_load_json(path), path, "images", 'an object with an "images" list (Karpathy format)')
        self.by_cocoid: dict[int | str, tuple[str, str]] = {}
        self.by_filename: dict[str, tuple[str, str]] = {}
        for index, entry in enumerate(images):
            parsed = _karpathy_entry(path, index, entry, problems)
            if parsed is None:
                continue
            where, filename, filepath, split = parsed
            cocoid = entry.get("cocoid")
            if cocoid is not None and cocoid in self.by_cocoid:
                problems(f"{where}: duplicate cocoid {cocoid}; give every image its own cocoid")
                continue
            if filename in self.by_filename:
                problems(f"{where}: duplicate filename {filename!r}; remove one of the two entries")
                continue
            if cocoid is not None:
                self.by_cocoid[cocoid] = (split, filepath)
            self.by_filename[filename] = (split, filepath)

    def lookup(self, image_id: int | str, file_name: str) -> tuple[str, str] | None:
        found = self.by_cocoid.get(image_id)
        return found if found is not None else self.by_filename.get(posixpath.basename(file_name))


def _read_coco_file(path: Path, data: Any, file_split: str | None, split_index: _KarpathySplitIndex | None,
                    problems: _Problems) -> list[_Pending]:
    expected = 'an object with "images" and "annotations" lists (COCO captions format)'
    images = _top_level_list(data, path, "images", expected)
    annotations = _top_level_list(data, path, "annotations", expected)
    name = path.name

    kept_images: list[dict] = []
    where_of: dict[int | str, str] = {}
    index_of_name: dict[str, int] = {}
    # Images dropped under skip_invalid, by id: reported after the annotations, with their caption counts.
    dropped: dict[int | str, str] = {}
    dropped_captions: dict[int | str, int] = {}
    for index, image in enumerate(images):
        where = f"{name}: images[{index}]"
        if not isinstance(image, dict):
            problems(f"{where}: expected an object, found {_type_name(image)}")
            continue
        image_id, file_name = image.get("id"), image.get("file_name")
        if image_id is not None:
            where += f" (id {image_id}" + (f", {file_name!r})" if isinstance(file_name, str) else ")")
        if "id" not in image:
            problems(f"{where}: missing key 'id'")
            continue
        if not _is_id(image_id):
            problems(f"{where}: 'id' must be an integer, found {image_id!r}")
            continue
        if image_id in where_of:
            problems(f"{where}: duplicate image id {image_id} (also {where_of[image_id].split(': ', 1)[1]}); "
                     "give every image its own id")
            continue
        if "file_name" not in image:
            problem = f"{where}: missing key 'file_name'"
        elif not isinstance(file_name, str) or not file_name.strip():
            problem = f"{where}: 'file_name' must be a non-empty string, found {file_name!r}"
        elif file_name in index_of_name:
            problem = (f"{where}: duplicate file name {file_name!r} (also images[{index_of_name[file_name]}]); "
                       "remove one of the two entries")
        else:
            index_of_name[file_name] = index
            where_of[image_id] = where
            kept_images.append(image)
            continue
        if not problems.skip_invalid:
            problems(problem)
        dropped.setdefault(image_id, problem)
        dropped_captions.setdefault(image_id, 0)

    kept_annotations: list[dict] = []
    for index, annotation in enumerate(annotations):
        if isinstance(annotation, dict) and "id" in annotation:  # the common case, checked without messages
            image_id, caption = annotation.get("image_id"), annotation.get("caption")
            if (type(image_id) in (int, str) and image_id in where_of and isinstance(caption, str)
                    and caption.strip()):
                kept_annotations.append({"id": annotation["id"], "image_id": image_id, "caption": caption.strip()})
                continue
        where = f"{name}: annotations[{index}]"
        if not isinstance(annotation, dict):
            problems(f"{where}: expected an object, found {_type_name(annotation)}")
            continue
        if "id" in annotation:
            where += f" (annotation {annotation['id']})"
        missing = [key for key in ("id", "image_id", "caption") if key not in annotation]
        if missing:
            problems(f"{where}: missing key '{missing[0]}'")
            continue
        image_id = annotation["image_id"]
        if not _is_id(image_id):
            problems(f"{where}: 'image_id' must be an integer, found {image_id!r}")
            continue
        if image_id not in where_of:
            if image_id in dropped:
                dropped_captions[image_id] += 1
            else:
                problems(f"{where}: refers to image {image_id}, which is not in images[]; "
                         "fix the image_id or add the image")
            continue
        caption = _check_caption(annotation["caption"], where, "caption", problems)
        if caption is not None:
            kept_annotations.append({"id": annotation["id"], "image_id": image_id, "caption": caption})
    for image_id, problem in dropped.items():
        problems(f"{problem}; skipped the image and its {dropped_captions[image_id]} caption(s)")

    coco = _coco_index(kept_images, kept_annotations)
    pending = []
    for image in kept_images:
        image_id, file_name = image["id"], image["file_name"]
        where = where_of[image_id]
        captions = [annotation["caption"] for annotation in coco.imgToAnns.get(image_id, ())]
        if not captions:
            problems(f"{where}: image has no captions (no usable annotation refers to image id {image_id}); "
                     "add annotations or remove the image")
            continue
        candidates = [file_name, *(posixpath.join(folder, file_name) for folder in _COCO_SUBFOLDERS)]
        if split_index is None:
            split = file_split
        else:
            found = split_index.lookup(image_id, file_name)
            if found is None:
                problems(f"{where}: not in the split file {split_index.path.name} (matched on cocoid and "
                         "filename); add it there or remove the image")
                continue
            split, filepath = found
            if filepath:
                candidates.insert(0, posixpath.join(filepath, posixpath.basename(file_name)))
        pending.append(_Pending(where, candidates, captions, split, image_id))
    return pending


def _coco_index(images: list[dict], annotations: list[dict]) -> Any:
    """A pycocotools COCO index over already-checked entries (its progress prints silenced)."""
    from pycocotools.coco import COCO  # imported here: only COCO files need it

    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# --------------------------------------------------------------------------------------------------------
# Flickr8k original release


def read_flickr8k(token_file: PathLike, images_dir: PathLike | None = None,
                  split_files: Mapping[str, PathLike] | None = None, skip_invalid: bool = False) -> Dataset:
    """Read `Flickr8k.token.txt` (`name.jpg#k<TAB>caption` lines) and the split lists.

    `split_files` maps split names ("train", "dev"/"val", "test") to image-list files; by default the
    three `Flickr_8k.{train,dev,test}Images.txt` beside the token file. Images that no list names go to
    train (the official lists leave out 91 images). Pass `split_files={}` to put every image in train.
    `images_dir` defaults to the token file's folder / "images" (or "Flicker8k_Dataset").
    """
    path = _require_file(Path(token_file), "Flickr8k token file")
    finder = _ImageFinder(Path(images_dir) if images_dir is not None else _default_images_dir(path.parent))
    if split_files is None:
        split_files = {split: path.parent / file_name for split, file_name in FLICKR8K_SPLIT_FILES.items()}
        missing = [str(p) for p in split_files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{path.name}: split list(s) not found beside it: {', '.join(missing)}; "
                                    "pass split_files={'train': ..., 'val': ..., 'test': ...} "
                                    "(or split_files={} to put every image in train)")
    report = LoadReport()
    problems = _Problems(skip_invalid, report)
    captions_of, line_of = _read_token_file(path, problems)
    split_of = _read_split_lists(split_files, path.name, captions_of, problems)
    pending = [
        _Pending(f"{path.name}: image {image} (line {line_of[image]})", [image], captions,
                 split_of.get(image, "train"), None)
        for image, captions in captions_of.items()
    ]
    records = _finish(pending, finder, problems)
    lists = ", ".join(f"{split}={Path(p).name}" for split, p in split_files.items())
    return Dataset(records, report, f"flickr8k {path} (splits: {lists or 'none, all train'}; images in {finder.root})")


def _read_token_file(path: Path, problems: _Problems) -> tuple[dict[str, list[str]], dict[str, int]]:
    """image name -> captions (in file order), and image name -> line of its first caption."""
    captions_of: dict[str, list[str]] = {}
    line_of: dict[str, int] = {}
    line_of_key: dict[str, int] = {}
    for line_number, line in enumerate(_read_text(path), start=1):
        key, tab, caption = line.partition("\t")
        key = key.strip()
        image, hash_sign, number = key.rpartition("#")
        caption = caption.strip()
        if image and number.isdigit() and caption and key not in line_of_key:  # the common case
            line_of_key[key] = line_number
            if image not in captions_of:
                captions_of[image] = []
                line_of[image] = line_number
            captions_of[image].append(caption)
            continue
        if not line.strip():
            continue
        where = f"{path.name}: line {line_number}"
        if not tab:
            problems(f"{where}: expected '<image>#<n><TAB><caption>', found no tab in {line[:80]!r}")
            continue
        if not hash_sign or not image or not number.isdigit():
            problems(f"{where}: expected '<image>#<n>' before the tab, found {key!r}")
            continue
        where += f" ({key})"
        if key in line_of_key:
            problems(f"{where}: duplicate caption {key} (also line {line_of_key[key]}); remove one of them")
            continue
        line_of_key[key] = line_number
        problems(f"{where}: empty caption; fill it in or remove the line")
    return captions_of, line_of


def _read_split_lists(split_files: Mapping[str, PathLike], token_name: str,
                      captions_of: dict[str, list[str]], problems: _Problems) -> dict[str, str]:
    """image name -> split, from the image-list files."""
    split_of: dict[str, str] = {}
    listed_at: dict[str, str] = {}
    for split_name, list_file in split_files.items():
        split = SPLIT_ALIASES.get(split_name)
        if split is None:
            raise ValueError(f"split_files: unknown split {split_name!r}; use train, val (or dev) and test")
        list_path = _require_file(Path(list_file), f"{split_name} image list")
        for line_number, line in enumerate(_read_text(list_path), start=1):
            image = line.strip()
            if not image:
                continue
            where = f"{list_path.name}: line {line_number} ({image})"
            if image in listed_at:
                problems(f"{where}: image is listed twice (also {listed_at[image]}); keep one listing")
                continue
            if image not in captions_of:
                problems(f"{where}: image has no captions in {token_name}; remove it from the list "
                         "or add its captions")
                continue
            listed_at[image] = f"{list_path.name}: line {line_number}"
            split_of[image] = split
    return split_of


# --------------------------------------------------------------------------------------------------------
# Detection


def load_dataset(source: PathLike | Sequence[PathLike], layout: str = "auto", images_dir: PathLike | None = None,
                 skip_invalid: bool = False, karpathy_split: PathLike | None = None) -> Dataset:
    """Read a dataset from a file or a folder, detecting its layout unless `layout` names one.

    Folder: a `dataset_*.json` -> Karpathy; else `Flickr8k.token.txt` -> Flickr8k; else all
    `captions_*.json` -> COCO (COCO also when `karpathy_split` is given). File: json with
    images[].sentences -> Karpathy; json with "annotations" -> COCO; .txt -> Flickr8k.
    A list of files is read as COCO.
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use auto, {', '.join(LAYOUTS)}")
    if karpathy_split is not None and layout not in ("auto", "coco"):
        raise ValueError(f"karpathy_split only applies to COCO files, not to layout={layout!r}")
    if karpathy_split is not None:
        layout = "coco"
    if not isinstance(source, (str, os.PathLike)):
        if layout not in ("auto", "coco"):
            raise ValueError(f"a list of files is read as COCO caption files, not as layout={layout!r}")
        return read_coco(source, images_dir, karpathy_split, skip_invalid)
    path = Path(source)
    if path.is_dir():
        return _load_folder(path, layout, images_dir, skip_invalid, karpathy_split)
    _require_file(path, "dataset source")
    if layout == "flickr8k" or (layout == "auto" and path.suffix.lower() == ".txt"):
        return read_flickr8k(path, images_dir, skip_invalid=skip_invalid)
    data = _load_json(path)
    if layout == "auto":
        layout = _json_layout(path, data)
    if layout == "karpathy":
        return _read_karpathy(path, data, images_dir, skip_invalid)
    return _read_coco([(path, data)], images_dir, karpathy_split, skip_invalid)


def _json_layout(path: Path, data: Any) -> str:
    if isinstance(data, dict):
        if "annotations" in data:
            return "coco"
        images = data.get("images")
        if isinstance(images, list) and any(isinstance(entry, dict) and "sentences" in entry for entry in images):
            return "karpathy"
    raise DataFormatError(f"{path.name}: cannot tell the layout: looked for images[].sentences (Karpathy) and a "
                          "top-level 'annotations' list (COCO captions); pass layout= to force one")


def _load_folder(folder: Path, layout: str, images_dir: PathLike | None, skip_invalid: bool,
                 karpathy_split: PathLike | None) -> Dataset:
    karpathy_files = sorted(folder.glob("dataset_*.json"))
    token_files = [folder / "Flickr8k.token.txt"] if (folder / "Flickr8k.token.txt").is_file() else \
        sorted(folder.glob("*.token.txt"))
    coco_files = sorted(folder.glob("captions_*.json"))
    if layout == "auto":
        if karpathy_files:
            layout = "karpathy"
        elif token_files:
            layout = "flickr8k"
        elif coco_files:
            layout = "coco"
        else:
            raise DataFormatError(f"{folder}: no dataset found: looked for dataset_*.json (Karpathy), "
                                  "Flickr8k.token.txt (Flickr8k) and captions_*.json (COCO)")
    wanted = {"karpathy": (karpathy_files, "dataset_*.json"), "flickr8k": (token_files, "Flickr8k.token.txt"),
              "coco": (coco_files, "captions_*.json")}
    files, pattern = wanted[layout]
    if not files:
        raise DataFormatError(f"{folder}: layout={layout!r} but no {pattern} file found there")
    if layout == "coco":
        return read_coco(files, images_dir, karpathy_split, skip_invalid)
    if len(files) > 1:
        raise DataFormatError(f"{folder}: several {pattern} files ({', '.join(f.name for f in files)}); "
                              "pass the one to read as source")
    if layout == "karpathy":
        return read_karpathy(files[0], images_dir, skip_invalid)
    return read_flickr8k(files[0], images_dir, skip_invalid=skip_invalid)
