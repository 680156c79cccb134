"""`load_dataset`: detect a file's or a folder's layout (Karpathy, COCO, Flickr8k) and read it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captioner.data.coco import read_coco, read_coco_data
from captioner.data.common import PathLike, load_json, require_file
from captioner.data.flickr8k import read_flickr8k
from captioner.data.karpathy import read_karpathy, read_karpathy_data
from captioner.data.records import DataFormatError, Dataset

LAYOUTS = ("karpathy", "coco", "flickr8k")




def load_dataset(source: PathLike | Sequence[PathLike], layout: str = "auto", images_dir: PathLike | None = None,
                 skip_invalid: bool = False, karpathy_split: PathLike | None = None) -> Dataset:
    """Read a dataset from a file or a folder, detecting its layout unless `layout` names one.

    Folder: a `dataset_*.json` -> Karpathy; else `Flickr8k.token.txt` -> Flickr8k; else all
    `captions*.json` (captions_train2014.json, coco-dev's captions.json) -> COCO (COCO also when `karpathy_split` is given). File: json with
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
    require_file(path, "dataset source")
    if layout == "flickr8k" or (layout == "auto" and path.suffix.lower() == ".txt"):
        return read_flickr8k(path, images_dir, skip_invalid=skip_invalid)
    data = load_json(path)
    if layout == "auto":
        layout = _json_layout(path, data)
    if layout == "karpathy":
        return read_karpathy_data(path, data, images_dir, skip_invalid)
    return read_coco_data([(path, data)], images_dir, karpathy_split, skip_invalid)


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
    coco_files = sorted(folder.glob("captions*.json"))
    if layout == "auto":
        if karpathy_files:
            layout = "karpathy"
        elif token_files:
            layout = "flickr8k"
        elif coco_files:
            layout = "coco"
        else:
            raise DataFormatError(f"{folder}: no dataset found: looked for dataset_*.json (Karpathy), "
                                  "Flickr8k.token.txt (Flickr8k) and captions*.json (COCO)")
    wanted = {"karpathy": (karpathy_files, "dataset_*.json"), "flickr8k": (token_files, "Flickr8k.token.txt"),
              "coco": (coco_files, "captions*.json")}
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
