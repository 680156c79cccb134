"""The original Flickr8k release: `Flickr8k.token.txt` and the `Flickr_8k.*Images.txt` split lists."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from captioner.data.common import (
    ImageFinder,
    PathLike,
    Pending,
    Problems,
    caption_problem,
    default_images_dir,
    finish_records,
    read_text,
    require_file,
)
from captioner.data.records import SPLIT_ALIASES, Dataset, LoadReport

FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}




def read_flickr8k(token_file: PathLike, images_dir: PathLike | None = None,
                  split_files: Mapping[str, PathLike] | None = None, skip_invalid: bool = False) -> Dataset:
    """Read `Flickr8k.token.txt` (`name.jpg#k<TAB>caption` lines) and the split lists.

    `split_files` maps split names ("train", "dev"/"val", "test") to image-list files; by default the
    three `Flickr_8k.{train,dev,test}Images.txt` beside the token file. Images that no list names go to
    train (the official lists leave out 91 images). Pass `split_files={}` to put every image in train.
    `images_dir` defaults to the token file's folder / "images" (or "Flicker8k_Dataset").
    """
    path = require_file(Path(token_file), "Flickr8k token file")
    finder = ImageFinder(Path(images_dir) if images_dir is not None else default_images_dir(path.parent))
    if split_files is None:
        split_files = {split: path.parent / file_name for split, file_name in FLICKR8K_SPLIT_FILES.items()}
        missing = [str(p) for p in split_files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{path.name}: split list(s) not found beside it: {', '.join(missing)}; "
                                    "pass split_files={'train': ..., 'val': ..., 'test': ...} "
                                    "(or split_files={} to put every image in train)")
    report = LoadReport()
    problems = Problems(skip_invalid, report)
    captions_of, line_of = _read_token_file(path, problems)
    split_of = _read_split_lists(split_files, path.name, captions_of, problems)
    pending = [
        Pending(f"{path.name}: image {image} (line {line_of[image]})", [image], captions,
                 split_of.get(image, "train"), None)
        for image, captions in captions_of.items()
    ]
    records = finish_records(pending, finder, problems)
    lists = ", ".join(f"{split}={Path(p).name}" for split, p in split_files.items())
    return Dataset(records, report, f"flickr8k {path} (splits: {lists or 'none, all train'}; images in {finder.root})")


def _read_token_file(path: Path, problems: Problems) -> tuple[dict[str, list[str]], dict[str, int]]:
    """image name -> captions (in file order), and image name -> line of its first caption."""
    captions_of: dict[str, list[str]] = {}
    line_of: dict[str, int] = {}
    line_of_key: dict[str, int] = {}
    for line_number, line in enumerate(read_text(path), start=1):
        key, tab, caption = line.partition("\t")
        key = key.strip()
        image, hash_sign, number = key.rpartition("#")
        caption = caption.strip()
        problem = caption_problem(caption)
        if image and number.isdigit() and problem is None and key not in line_of_key:  # the common case
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
        problems(f"{where}: {caption_problem(caption, 'line')}")
    return captions_of, line_of


def _read_split_lists(split_files: Mapping[str, PathLike], token_name: str,
                      captions_of: dict[str, list[str]], problems: Problems) -> dict[str, str]:
    """image name -> split, from the image-list files."""
    split_of: dict[str, str] = {}
    listed_at: dict[str, str] = {}
    for split_name, list_file in split_files.items():
        split = SPLIT_ALIASES.get(split_name)
        if split is None:
            raise ValueError(f"split_files: unknown split {split_name!r}; use train, val (or dev) and test")
        list_path = require_file(Path(list_file), f"{split_name} image list")
        for line_number, line in enumerate(read_text(list_path), start=1):
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
