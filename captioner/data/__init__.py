"""Caption data: one record type, and readers for the COCO, Karpathy and Flickr8k layouts."""

from captioner.data.readers import Dataset, load_dataset, read_coco, read_flickr8k, read_karpathy
from captioner.data.records import SPLITS, CaptionRecord, DataFormatError, LoadReport

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
