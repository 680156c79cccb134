"""Caption data: one record type, and readers for the COCO, Karpathy and Flickr8k layouts.

    records   CaptionRecord, Dataset, LoadReport, DataFormatError
    common    what the readers share (problem reporting, finding image files, checked file reading)
    karpathy  read_karpathy: Karpathy's dataset_*.json
    coco      read_coco: MS-COCO caption files
    flickr8k  read_flickr8k: the original Flickr8k release
    layout    load_dataset: detect a file's or folder's layout and read it

Every reader checks what it reads. A problem raises `DataFormatError` naming the file, the entry and
the problem; with `skip_invalid=True` the offending caption or image is dropped instead and the problem
is listed in `Dataset.report`. Captions keep their text, minus leading/trailing whitespace.
"""

from captioner.data.coco import read_coco
from captioner.data.flickr8k import read_flickr8k
from captioner.data.karpathy import read_karpathy
from captioner.data.layout import load_dataset
from captioner.data.records import SPLITS, CaptionRecord, DataFormatError, Dataset, LoadReport

__all__ = [
    "SPLITS",
    "CaptionRecord",
    "DataFormatError",
    "Dataset",
    "LoadReport",
    "load_dataset",
    "read_coco",
    "read_flickr8k",
    "read_karpathy",
]
