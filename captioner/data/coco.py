"""MS-COCO caption files (through pycocotools), split by file name or by a Karpathy split file."""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captioner.data.common import (
    COCO_SUBFOLDERS,
    ImageFinder,
    PathLike,
    Pending,
    Problems,
    caption_problem,
    check_caption,
    default_images_dir,
    finish_records,
    is_id,
    load_json,
    require_file,
    top_level_list,
    type_name,
)
from captioner.data.karpathy import karpathy_entry
from captioner.data.records import SPLIT_ALIASES, DataFormatError, Dataset, LoadReport


def read_coco(captions_json: PathLike | Sequence[PathLike], images_dir: PathLike | None = None,
              karpathy_split: PathLike | None = None, skip_invalid: bool = False) -> Dataset:
    """Read MS-COCO caption files (one path or several) through pycocotools.

    The split of each file comes from its name (train / val / dev / test as a word in it; a name with none,
    like coco-dev's `captions.json`, makes the whole file one split, `UNNAMED_SPLIT`), or, with
    `karpathy_split` (a Karpathy `dataset_coco.json`), per image from that file (matched on cocoid, else file name;
    restval counts as train). Images are looked for under `images_dir` at the Karpathy `filepath`,
    then `file_name`, train2014/`file_name` and val2014/`file_name`. `images_dir` defaults to the
    first file's folder / "images" when that exists, else that folder.
    """
    paths = [Path(captions_json)] if isinstance(captions_json, (str, os.PathLike)) else [Path(p) for p in captions_json]
    if not paths:
        raise ValueError("read_coco needs at least one captions json file")
    loaded = [(path, load_json(require_file(path, "COCO captions file"))) for path in paths]
    return read_coco_data(loaded, images_dir, karpathy_split, skip_invalid)


def read_coco_data(loaded: list[tuple[Path, Any]], images_dir: PathLike | None,
               karpathy_split: PathLike | None, skip_invalid: bool) -> Dataset:
    finder = ImageFinder(Path(images_dir) if images_dir is not None else default_images_dir(loaded[0][0].parent))
    report = LoadReport()
    problems = Problems(skip_invalid, report)
    split_index = _KarpathySplitIndex(Path(karpathy_split), problems) if karpathy_split is not None else None
    pending: list[Pending] = []
    unnamed: list[str] = []  # files whose name names no split
    for path, data in loaded:
        file_split = None if split_index is not None else split_from_file_name(path)
        if split_index is None and not _split_words(path):
            unnamed.append(path.name)
        pending += _read_coco_file(path, data, file_split, split_index, problems)
    records = finish_records(pending, finder, problems)
    files = ", ".join(str(path) for path, _ in loaded)
    split_note = f", splits from {karpathy_split}" if karpathy_split is not None else ""
    if unnamed:
        split_note += f", {' and '.join(unnamed)} naming no split: read as the {UNNAMED_SPLIT} split"
    return Dataset(records, report, f"coco {files} (images in {finder.root}{split_note})")


# The split of a COCO file whose name names none (coco-dev's `captions.json`): a file someone hands over
# as it is, with no split in its name, is most often a set to score, and "test" is `captioner evaluate`'s
# default --split, so `captioner evaluate --data that-file` works as it is. A command asking such a file
# for another split stops with a message that names this rule (Dataset.require_split, via the source).
UNNAMED_SPLIT = "test"


def _split_words(path: Path) -> set[str]:
    words = re.split(r"[^a-z]+", path.stem.lower())
    return {SPLIT_ALIASES[word] for word in words if word in SPLIT_ALIASES}


def split_from_file_name(path: Path) -> str:
    """The split a COCO file's name gives its images: the one split word in it (train / val / dev / test,
    as a word), or `UNNAMED_SPLIT` when it has none. A name with two different ones is refused."""
    found = _split_words(path)
    if not found:
        return UNNAMED_SPLIT
    if len(found) > 1:
        raise DataFormatError(
            f"{path.name}: the file name names two splits ({' and '.join(sorted(found))}; looked for train, "
            "val, dev, test as words in it); rename the file or give --karpathy-split (karpathy_split= in "
            "Python)")
    return found.pop()


class _KarpathySplitIndex:
    """Split and folder of each image in a Karpathy file, looked up by cocoid or file name."""

    def __init__(self, path: Path, problems: Problems):
        self.path = require_file(path, "Karpathy split file")
        images = top_level_list(load_json(path), path, "images", 'an object with an "images" list (Karpathy format)')
        self.by_cocoid: dict[int | str, tuple[str, str]] = {}
        self.by_filename: dict[str, tuple[str, str]] = {}
        for index, entry in enumerate(images):
            parsed = karpathy_entry(path, index, entry, problems)
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
                    problems: Problems) -> list[Pending]:
    expected = 'an object with "images" and "annotations" lists (COCO captions format)'
    images = top_level_list(data, path, "images", expected)
    annotations = top_level_list(data, path, "annotations", expected)
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
            problems(f"{where}: expected an object, found {type_name(image)}")
            continue
        image_id, file_name = image.get("id"), image.get("file_name")
        if image_id is not None:
            where += f" (id {image_id}" + (f", {file_name!r})" if isinstance(file_name, str) else ")")
        if "id" not in image:
            problems(f"{where}: missing key 'id'")
            continue
        if not is_id(image_id):
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
                    and caption_problem(caption) is None):
                kept_annotations.append({"id": annotation["id"], "image_id": image_id, "caption": caption.strip()})
                continue
        where = f"{name}: annotations[{index}]"
        if not isinstance(annotation, dict):
            problems(f"{where}: expected an object, found {type_name(annotation)}")
            continue
        if "id" in annotation:
            where += f" (annotation {annotation['id']})"
        missing = [key for key in ("id", "image_id", "caption") if key not in annotation]
        if missing:
            problems(f"{where}: missing key '{missing[0]}'")
            continue
        image_id = annotation["image_id"]
        if not is_id(image_id):
            problems(f"{where}: 'image_id' must be an integer, found {image_id!r}")
            continue
        if image_id not in where_of:
            if image_id in dropped:
                dropped_captions[image_id] += 1
            else:
                problems(f"{where}: refers to image {image_id}, which is not in images[]; "
                         "fix the image_id or add the image")
            continue
        caption = check_caption(annotation["caption"], where, "caption", problems)
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
        candidates = [file_name, *(posixpath.join(folder, file_name) for folder in COCO_SUBFOLDERS)]
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
        pending.append(Pending(where, candidates, captions, split, image_id))
    return pending


def _coco_index(images: list[dict], annotations: list[dict]) -> Any:
    """A pycocotools COCO index over already-checked entries (its progress prints silenced)."""
    from pycocotools.coco import COCO  # imported here: only COCO files need it

    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
