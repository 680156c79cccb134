"""Karpathy's `dataset_*.json` (`images[].sentences[].raw`, with a split per image)."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

from captioner.data.common import (
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
from captioner.data.records import SPLIT_ALIASES, Dataset, LoadReport


def read_karpathy(json_path: PathLike, images_dir: PathLike | None = None,
                  skip_invalid: bool = False) -> Dataset:
    """Read a Karpathy-split file (`dataset_flickr8k.json`, `dataset_coco.json`, ...).

    `images_dir` defaults to the json's folder / "images" when that exists, else the json's folder
    (where COCO's `filepath` folders, train2014/ and val2014/, sit). Each image is looked for at
    `filepath/filename`, then `filename`, under it.
    """
    path = require_file(Path(json_path), "Karpathy split file")
    return read_karpathy_data(path, load_json(path), images_dir, skip_invalid)


def read_karpathy_data(path: Path, data: Any, images_dir: PathLike | None, skip_invalid: bool) -> Dataset:
    images = top_level_list(data, path, "images", 'an object with an "images" list (Karpathy format)')
    finder = ImageFinder(Path(images_dir) if images_dir is not None else default_images_dir(path.parent))
    report = LoadReport()
    problems = Problems(skip_invalid, report)
    pending: list[Pending] = []
    first_index_of_id: dict[int | str, int] = {}
    for index, entry in enumerate(images):
        parsed = karpathy_entry(path, index, entry, problems)
        if parsed is None:
            continue
        where, filename, filepath, split = parsed
        image_number = entry.get("imgid")
        if image_number is not None:
            if not is_id(image_number):
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
                                     else f"'sentences' must be a list, found {type_name(sentences)}"))
            continue
        captions = []
        for number, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if isinstance(raw, str) and caption_problem(raw) is None:  # the common case, without messages
                captions.append(raw.strip())
                continue
            sentence_where = f"{where}: sentences[{number}]"
            if not isinstance(sentence, dict):
                problems(f"{sentence_where}: expected an object with a 'raw' caption, found {type_name(sentence)}")
            elif "raw" not in sentence:
                problems(f"{sentence_where}: missing key 'raw'")
            elif (caption := check_caption(sentence["raw"], sentence_where, "raw", problems)) is not None:
                captions.append(caption)
        if not captions:
            problems(f"{where}: image has no captions" + (" left" if sentences else "") +
                     "; add sentences or remove the image")
            continue
        source_id = entry.get("cocoid", image_number)
        candidates = [posixpath.join(filepath, filename), filename] if filepath else [filename]
        pending.append(Pending(where, candidates, captions, split, source_id))
    records = finish_records(pending, finder, problems)
    return Dataset(records, report, f"karpathy {path} (images in {finder.root})")


def karpathy_entry(path: Path, index: int, entry: Any,
                    problems: Problems) -> tuple[str, str, str, str] | None:
    """(where, filename, filepath, normalised split) of one images[] entry, or None if it is unusable."""
    where = f"{path.name}: images[{index}]"
    if not isinstance(entry, dict):
        problems(f"{where}: expected an object, found {type_name(entry)}")
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
