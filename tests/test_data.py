"""Dataset readers: the real Flickr8k in all three layouts, then small broken files written per test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from captioner.data import (
    CaptionRecord,
    DataFormatError,
    Dataset,
    LoadReport,
    load_dataset,
    read_coco,
    read_flickr8k,
    read_karpathy,
)
from captioner.data.coco import UNNAMED_SPLIT, split_from_file_name

LAYOUTS = ("karpathy", "coco", "flickr8k")


def content(dataset: Dataset) -> dict[str, tuple[str, list[str]]]:
    return {r.image_id: (r.split, sorted(r.captions)) for r in dataset.records}


# ----------------------------------------------------------------------------------------------------------
# The real Flickr8k


@pytest.fixture(scope="module")
def flickr8k_layouts(flickr8k_dir: Path) -> dict[str, Dataset]:
    return {layout: load_dataset(flickr8k_dir, layout=layout) for layout in LAYOUTS}


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flickr8k_counts(flickr8k_layouts, layout):
    dataset = flickr8k_layouts[layout]
    assert len(dataset) == 8091
    assert sum(len(r.captions) for r in dataset.records) == 40455
    assert [len(dataset.split(s)) for s in ("train", "val", "test")] == [6091, 1000, 1000]
    assert dataset.split("dev") == dataset.split("val")
    assert not dataset.report
    assert dataset.source.startswith(layout)
    first = dataset.records[0]
    assert first.image_path.is_file() and first.image_path.name == first.image_id
    assert all(len(r.captions) == 5 for r in dataset.records)


@pytest.mark.slow
@pytest.mark.shared_data
def test_flickr8k_layouts_agree(flickr8k_layouts):
    karpathy, coco, flickr8k = (flickr8k_layouts[layout] for layout in LAYOUTS)
    assert content(karpathy) == content(coco) == content(flickr8k)
    assert karpathy.fingerprint() == coco.fingerprint() == flickr8k.fingerprint()
    assert {r.source_id for r in flickr8k.records} == {None}
    assert all(isinstance(r.source_id, int) for r in karpathy.records + coco.records)
    # The known duplicate photo keeps both names, both in train.
    splits = dict((r.image_id, r.split) for r in karpathy.records)
    assert splits["2851198725_37b6027625.jpg"] == splits["3050606344_af711c726c.jpg"] == "train"


@pytest.mark.slow
@pytest.mark.shared_data
def test_flickr8k_auto_detection(flickr8k_dir, flickr8k_layouts, tmp_path):
    reference = flickr8k_layouts["karpathy"].fingerprint()
    assert load_dataset(flickr8k_dir).source.startswith("karpathy")  # the folder holds all three
    for file_name, layout in [("dataset_flickr8k.json", "karpathy"), ("Flickr8k.token.txt", "flickr8k")]:
        dataset = load_dataset(flickr8k_dir / file_name)
        assert dataset.source.startswith(layout) and dataset.fingerprint() == reference
    val = load_dataset(flickr8k_dir / "captions_val.json")
    assert val.source.startswith("coco") and len(val) == 1000 and {r.split for r in val.records} == {"val"}

    # Folders holding one layout each (links to the real files).
    for layout, names in [("flickr8k", ["Flickr8k.token.txt", *(f"Flickr_8k.{s}Images.txt" for s in
                                                                 ("train", "dev", "test"))]),
                          ("coco", [f"captions_{s}.json" for s in ("train", "val", "test")])]:
        folder = tmp_path / layout
        folder.mkdir()
        for name in [*names, "images"]:
            (folder / name).symlink_to(flickr8k_dir / name)
        dataset = load_dataset(folder)
        assert dataset.source.startswith(layout) and dataset.fingerprint() == reference


@pytest.mark.slow
@pytest.mark.shared_data
def test_flickr8k_coco_with_karpathy_split(flickr8k_dir, flickr8k_layouts):
    coco_files = sorted(flickr8k_dir.glob("captions_*.json"))
    dataset = read_coco(coco_files, flickr8k_dir / "images", karpathy_split=flickr8k_dir / "dataset_flickr8k.json")
    assert dataset.fingerprint() == flickr8k_layouts["karpathy"].fingerprint()


@pytest.mark.shared_data
def test_coco_dev_reads_as_it_is(coco_dev_dir):
    """coco-dev's captions.json names no split: its 100 photos, 5 captions each, are the test split, from
    the folder or the file, with images found in images/."""
    from_folder, from_file = load_dataset(coco_dev_dir), load_dataset(coco_dev_dir / "captions.json")
    assert from_folder.fingerprint() == from_file.fingerprint()
    test = from_folder.require_split("test")
    assert len(test) == len(from_folder) == 100 and all(len(r.captions) == 5 for r in test)
    assert all(r.image_path.parent == coco_dev_dir / "images" and r.image_path.is_file() for r in test)


# ----------------------------------------------------------------------------------------------------------
# Small files written by the tests

NAMES = ["a.jpg", "b.jpg", "c.jpg"]
CAPTIONS = {name: [f"caption {k} of {name}" for k in range(2)] for name in NAMES}
SPLIT_OF = {"a.jpg": "train", "b.jpg": "val", "c.jpg": "test"}


def touch_images(folder: Path, names=NAMES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=1))
    return path


def karpathy_data() -> dict:
    return {"dataset": "tiny", "images": [
        {"filepath": "images", "filename": name, "imgid": i, "split": "restval" if name == "a.jpg" else
         SPLIT_OF[name], "sentences": [{"raw": c, "tokens": c.split()} for c in CAPTIONS[name]]}
        for i, name in enumerate(NAMES)]}


def coco_data(names=NAMES, first_id=1) -> dict:
    images = [{"id": first_id + i, "file_name": name} for i, name in enumerate(names)]
    annotations = [{"id": 100 * image["id"] + k, "image_id": image["id"], "caption": caption}
                   for image in images for k, caption in enumerate(CAPTIONS[image["file_name"]])]
    return {"images": images, "annotations": annotations}


def write_flickr8k(folder: Path, lines: list[str] | None = None, lists: dict[str, list[str]] | None = None) -> Path:
    if lines is None:
        lines = [f"{name}#{k}\t{c}" for name in NAMES for k, c in enumerate(CAPTIONS[name])]
    if lists is None:
        lists = {"train": ["a.jpg"], "dev": ["b.jpg"], "test": ["c.jpg"]}
    token = folder / "Flickr8k.token.txt"
    token.write_text("\n".join(lines) + "\n")
    for split, names in lists.items():
        (folder / f"Flickr_8k.{split}Images.txt").write_text("".join(f"{n}\n" for n in names))
    return token


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A folder with the same three images in all three layouts."""
    touch_images(tmp_path / "images")
    write_json(tmp_path / "dataset_tiny.json", karpathy_data())
    write_flickr8k(tmp_path)
    for split, name in [("train", "a.jpg"), ("val", "b.jpg"), ("test", "c.jpg")]:
        write_json(tmp_path / f"captions_{split}.json", coco_data([name], first_id=NAMES.index(name) + 1))
    return tmp_path


def raises(match_all: list[str], call, *args, **kwargs) -> str:
    with pytest.raises(DataFormatError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    for fragment in match_all:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_tiny_layouts_agree(tiny):
    expected = {name: (SPLIT_OF[name], sorted(CAPTIONS[name])) for name in NAMES}
    datasets = [load_dataset(tiny, layout=layout) for layout in LAYOUTS]
    for dataset in datasets:
        assert content(dataset) == expected
        assert all(isinstance(r, CaptionRecord) and r.image_path == tiny / "images" / r.image_id
                   for r in dataset.records)
    assert len({d.fingerprint() for d in datasets}) == 1
    assert load_dataset(tiny).source.startswith("karpathy")  # preferred when several layouts are present
    assert load_dataset(tiny / "Flickr8k.token.txt").source.startswith("flickr8k")
    assert load_dataset(tiny / "captions_val.json").source.startswith("coco")
    assert load_dataset([tiny / "captions_val.json", tiny / "captions_test.json"]).source.startswith("coco")
    assert read_karpathy(tiny / "dataset_tiny.json").records[1].source_id == 1


def test_dataset_helpers(tiny):
    dataset = read_karpathy(tiny / "dataset_tiny.json")
    assert len(dataset) == 3 and list(dataset) == dataset.records
    assert [r.image_id for r in dataset.split("train")] == ["a.jpg"]  # restval -> train
    with pytest.raises(ValueError, match="unknown split"):
        dataset.split("holdout")
    reordered = Dataset(list(reversed(dataset.records)), LoadReport(), "reversed")
    assert reordered.fingerprint() == dataset.fingerprint()
    changed = Dataset([*dataset.records[:2], CaptionRecord("c.jpg", Path("c.jpg"), ["other"], "test")])
    assert changed.fingerprint() != dataset.fingerprint()


def test_load_dataset_detection_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    raises(["dataset_*.json", "Flickr8k.token.txt", "captions*.json"], load_dataset, empty)
    odd = write_json(tmp_path / "odd.json", {"images": [{"file": "a.jpg"}]})
    raises(["odd.json", "sentences", "annotations"], load_dataset, odd)
    with pytest.raises(ValueError, match="unknown layout"):
        load_dataset(tmp_path, layout="voc")
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "missing.json")
    raises(["no captions*.json"], load_dataset, empty, layout="coco")


# Karpathy ---------------------------------------------------------------------------------------------------


def write_karpathy(tmp_path: Path, data) -> Path:
    touch_images(tmp_path / "images")
    return write_json(tmp_path / "dataset_tiny.json", data)


def test_karpathy_malformed_json(tmp_path):
    path = write_karpathy(tmp_path, {})
    path.write_text('{"images": [\n  {"filename": "a.jpg",}\n]}')
    raises(["dataset_tiny.json", "line 2, column", "invalid JSON"], read_karpathy, path)


@pytest.mark.parametrize("data, fragments", [
    ([], ["top level is a list"]),
    ({"dataset": "x"}, ["missing key 'images'"]),
    ({"images": {}}, ["'images' is an object"]),
])
def test_karpathy_bad_top_level(tmp_path, data, fragments):
    path = write_karpathy(tmp_path, data)
    raises(["dataset_tiny.json", *fragments], read_karpathy, path)
    raises(["dataset_tiny.json"], read_karpathy, path, skip_invalid=True)  # nothing to continue with


def break_entry(data: dict, index: int, change) -> dict:
    change(data["images"][index])
    return data


@pytest.mark.parametrize("change, fragments", [
    (lambda e: e.pop("sentences"), ["missing key 'sentences'"]),
    (lambda e: e.pop("filename"), ["images[1] (imgid 1)", "missing key 'filename'"]),
    (lambda e: e.update(split="holdout"), ["unknown split 'holdout'"]),
    (lambda e: e.update(sentences=[]), ["image has no captions"]),
    (lambda e: e["sentences"][1].update(raw="  "), ["sentences[1]", "empty caption"]),
    (lambda e: e["sentences"][0].update(raw=7), ["sentences[0]", "'raw' must be a string"]),
    (lambda e: e["sentences"][0].pop("raw"), ["sentences[0]", "missing key 'raw'"]),
    (lambda e: e.update(imgid=0), ["duplicate imgid 0", "also images[0]"]),
    (lambda e: e.update(filename="a.jpg"), ["image a.jpg is listed twice", "also dataset_tiny.json: images[0]"]),
    (lambda e: e.update(filename="zzz.jpg"), ["image file not found", "images/zzz.jpg", "images_dir="]),
])
def test_karpathy_entry_problems(tmp_path, change, fragments):
    path = write_karpathy(tmp_path, break_entry(karpathy_data(), 1, change))
    raises(["dataset_tiny.json: images[1]", *fragments, "skip_invalid=True"], read_karpathy, path)
    dataset = read_karpathy(path, skip_invalid=True)
    assert len(dataset.report.problems) == 1 and all(f in dataset.report.problems[0] for f in fragments)
    assert "skip_invalid" not in dataset.report.problems[0]
    if "sentences[1]" in fragments or "sentences[0]" in fragments:  # only the caption goes
        assert len(dataset) == 3 and len(dataset.records[1].captions) == 1
    else:  # the image goes
        assert [r.image_id for r in dataset.records] == ["a.jpg", "c.jpg"]


def test_karpathy_skip_collects_everything(tmp_path):
    data = karpathy_data()
    data["images"][0]["sentences"][0]["raw"] = ""
    data["images"][1]["filename"] = "missing.jpg"
    data["images"].append("not an entry")
    dataset = read_karpathy(write_karpathy(tmp_path, data), skip_invalid=True)
    assert [r.image_id for r in dataset.records] == ["a.jpg", "c.jpg"]
    assert len(dataset.records[0].captions) == 1
    assert len(dataset.report.problems) == 3
    assert "3 invalid entries skipped" in dataset.report.summary()


def test_karpathy_coco_style_filepath(tmp_path):
    touch_images(tmp_path / "val2014", ["COCO_val2014_000000000042.jpg"])
    data = {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "imgid": 0,
                        "cocoid": 42, "split": "val", "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]}]}]}
    dataset = read_karpathy(write_json(tmp_path / "dataset_coco.json", data))
    record = dataset.records[0]
    assert record.image_id == "val2014/COCO_val2014_000000000042.jpg" and record.source_id == 42
    assert record.image_path.is_file()


def test_missing_images_folder(tmp_path):
    path = write_json(tmp_path / "dataset_tiny.json", karpathy_data())
    with pytest.raises(FileNotFoundError, match="images_dir="):
        read_karpathy(path, images_dir=tmp_path / "nowhere")


# COCO -------------------------------------------------------------------------------------------------------


def write_coco(tmp_path: Path, data, name="captions_val.json") -> Path:
    touch_images(tmp_path / "images")
    return write_json(tmp_path / name, data)


def test_coco_annotation_for_unknown_image(tmp_path):
    data = coco_data()
    data["annotations"].append({"id": 1234, "image_id": 99, "caption": "A lost caption."})
    path = write_coco(tmp_path, data)
    raises(["captions_val.json: annotations[6] (annotation 1234): refers to image 99, which is not in images[]"],
           read_coco, path, tmp_path / "images")
    dataset = read_coco(path, tmp_path / "images", skip_invalid=True)
    assert len(dataset) == 3 and sum(len(r.captions) for r in dataset.records) == 6
    assert len(dataset.report.problems) == 1


@pytest.mark.parametrize("change, fragments, images_left, captions_left", [
    (lambda d: d["images"][1].pop("file_name"), ["images[1] (id 2)", "missing key 'file_name'"], 2, 4),
    (lambda d: d["images"][1].pop("id"), ["images[1]", "missing key 'id'"], 2, 4),  # + 2 orphan annotations
    (lambda d: d["images"][1].update(id=1), ["images[1] (id 1, 'b.jpg')", "duplicate image id 1"], 2, 4),
    (lambda d: d["images"][1].update(file_name="a.jpg"), ["images[1] (id 2, 'a.jpg')", "duplicate file name"], 2, 4),
    (lambda d: d["images"][1].update(file_name="zzz.jpg"), ["images[1] (id 2, 'zzz.jpg')", "image file not found"],
     2, 4),
    (lambda d: d["annotations"].pop(3) and d["annotations"].pop(2), ["images[1] (id 2, 'b.jpg')",
                                                                     "image has no captions"], 2, 4),
    (lambda d: d["annotations"][2].update(caption=""), ["annotations[2] (annotation 200)", "empty caption"], 3, 5),
    (lambda d: d["annotations"][2].update(caption=None), ["annotations[2]", "'caption' must be a string"], 3, 5),
    (lambda d: d["annotations"][2].pop("image_id"), ["annotations[2] (annotation 200)", "missing key 'image_id'"],
     3, 5),
    (lambda d: d["annotations"].append(["x"]), ["annotations[6]", "expected an object, found a list"], 3, 6),
])
def test_coco_entry_problems(tmp_path, change, fragments, images_left, captions_left):
    data = coco_data()
    change(data)
    path = write_coco(tmp_path, data)
    raises(["captions_val.json: ", *fragments], read_coco, path, tmp_path / "images")
    dataset = read_coco(path, tmp_path / "images", skip_invalid=True)
    assert len(dataset) == images_left
    assert sum(len(r.captions) for r in dataset.records) == captions_left
    assert any(all(f in p for f in fragments) for p in dataset.report.problems)
    assert {r.split for r in dataset.records} == {"val"}


def test_coco_skipped_image_takes_its_captions(tmp_path):
    data = coco_data()
    data["images"][1]["file_name"] = "a.jpg"
    dataset = read_coco(write_coco(tmp_path, data), tmp_path / "images", skip_invalid=True)
    assert dataset.report.problems == [
        "captions_val.json: images[1] (id 2, 'a.jpg'): duplicate file name 'a.jpg' (also images[0]); remove one "
        "of the two entries; skipped the image and its 2 caption(s)"]


def test_coco_bad_files(tmp_path):
    path = write_coco(tmp_path, {"images": []})
    raises(["captions_val.json", "missing key 'annotations'"], read_coco, path, tmp_path / "images")
    path.write_text('{"images": [], "annotations": [}')
    raises(["captions_val.json", "line 1, column", "invalid JSON"], read_coco, path, tmp_path / "images")
    two_splits = write_json(tmp_path / "captions_train_val.json", coco_data())
    raises(["captions_train_val.json", "names two splits (train and val", "karpathy_split="],
           read_coco, two_splits, tmp_path / "images")


# A COCO file whose name names no split (coco-dev's captions.json) is one split, "test". This replaces the
# refusal ("cannot tell the split from the file name") that these files met before.
def test_coco_file_naming_no_split_is_the_test_split(tmp_path):
    touch_images(tmp_path / "images")
    unnamed = write_json(tmp_path / "captions.json", coco_data())
    for source in (unnamed, tmp_path):  # the file, and its folder (captions*.json)
        dataset = load_dataset(source)
        assert [r.split for r in dataset.records] == ["test"] * 3 and UNNAMED_SPLIT == "test"
        assert "captions.json naming no split: read as the test split" in dataset.source
        assert [r.image_id for r in dataset.require_split("test")] == NAMES
        with pytest.raises(ValueError) as caught:
            dataset.require_split("val", split_flag="--split")
        message = str(caught.value)
        for fragment in ("captions.json", "no 'val' images", "it has test (3 images)", "naming no split",
                         "use --split test"):
            assert fragment in message, f"{fragment!r} not in {message!r}"
        with pytest.raises(ValueError) as caught:  # a caller without a --split flag is not told to use one
            dataset.require_split("train", advice="give data with a train split")
        assert "--split" not in str(caught.value) and str(caught.value).endswith("; give data with a train split")
    assert split_from_file_name(Path("captions_val2014.json")) == "val"
    assert split_from_file_name(Path("coco-dev.json")) == "val"  # dev is a split word
    assert split_from_file_name(Path("photos.json")) == "test"

    # beside a named file, each keeps its own rule
    named = write_coco(tmp_path, coco_data(["a.jpg"], first_id=7), "captions_train.json")
    data = coco_data(["b.jpg", "c.jpg"])
    write_json(unnamed, data)
    dataset = load_dataset(tmp_path)
    assert {r.image_id: r.split for r in dataset.records} == {"a.jpg": "train", "b.jpg": "test", "c.jpg": "test"}
    assert named.name in dataset.source and "naming no split" in dataset.source
    assert "naming no split" not in read_coco(named, tmp_path / "images").source


def test_require_split_on_a_dataset_with_several_splits(tiny):
    dataset = load_dataset(tiny, layout="karpathy")
    assert dataset.require_split("dev") == dataset.split("val")
    empty = Dataset([r for r in dataset.records if r.split != "val"], LoadReport(), "somewhere")
    with pytest.raises(ValueError, match=r"somewhere: no 'val' images; it has train \(1 images\), test \(1 images\)$"):
        empty.require_split("val")


def test_coco_several_files(tmp_path):
    train = write_coco(tmp_path, coco_data(["a.jpg", "b.jpg"]), "captions_train2014.json")
    dev = write_coco(tmp_path, coco_data(["c.jpg"], first_id=3), "captions_dev.json")
    dataset = read_coco([train, dev], tmp_path / "images")
    assert {r.image_id: r.split for r in dataset.records} == {"a.jpg": "train", "b.jpg": "train", "c.jpg": "val"}
    assert [r.source_id for r in dataset.records] == [1, 2, 3]

    clash = write_coco(tmp_path, coco_data(["c.jpg"], first_id=7), "captions_test.json")
    raises(["captions_test.json: images[0] (id 7, 'c.jpg')", "listed twice", "captions_dev.json"],
           read_coco, [train, dev, clash], tmp_path / "images")
    dataset = read_coco([train, dev, clash], tmp_path / "images", skip_invalid=True)
    assert len(dataset) == 3 and len(dataset.report.problems) == 1


def test_coco_real_layout_with_karpathy_split(tmp_path):
    """COCO 2014 folders, a Karpathy file with restval, split matched on cocoid."""
    names = {1: "COCO_train2014_000000000001.jpg", 2: "COCO_train2014_000000000002.jpg",
             3: "COCO_val2014_000000000003.jpg", 4: "COCO_val2014_000000000004.jpg",
             5: "COCO_val2014_000000000005.jpg"}
    touch_images(tmp_path / "train2014", [names[1], names[2]])
    touch_images(tmp_path / "val2014", [names[3], names[4], names[5]])

    def coco_file(ids, file_name):
        images = [{"id": i, "file_name": names[i], "width": 1, "height": 1} for i in ids]
        annotations = [{"id": 10 * i + k, "image_id": i, "caption": f"photo {i} caption {k} "} for i in ids
                       for k in range(3)]
        return write_json(tmp_path / file_name, {"info": {}, "images": images, "annotations": annotations,
                                                 "licenses": []})

    train, val = coco_file([1, 2], "captions_train2014.json"), coco_file([3, 4, 5], "captions_val2014.json")
    karpathy_splits = {1: "train", 2: "restval", 3: "restval", 4: "val", 5: "test"}
    split_file = write_json(tmp_path / "dataset_coco.json", {"images": [
        {"filepath": names[i].split("_")[1], "filename": names[i], "imgid": i - 1, "cocoid": i, "split": split,
         "sentences": []} for i, split in karpathy_splits.items()]})

    by_name = read_coco([train, val], tmp_path)  # no split file: the split follows the file name
    assert [r.split for r in by_name.records] == ["train", "train", "val", "val", "val"]
    assert by_name.records[2].image_id == f"val2014/{names[3]}"
    assert by_name.records[0].captions[0] == "photo 1 caption 0"  # whitespace at the ends is dropped

    dataset = load_dataset([train, val], images_dir=tmp_path, karpathy_split=split_file)
    assert {r.source_id: r.split for r in dataset.records} == {1: "train", 2: "train", 3: "train", 4: "val",
                                                              5: "test"}
    assert all(r.image_path.is_file() for r in dataset.records)
    assert load_dataset(tmp_path, karpathy_split=split_file).fingerprint() == dataset.fingerprint()

    only_val = read_coco(val, tmp_path, karpathy_split=split_file)  # a subset of the split file is fine
    assert [r.split for r in only_val.records] == ["train", "val", "test"]

    data = json.loads(split_file.read_text())
    del data["images"][3]
    write_json(split_file, data)
    raises(["captions_val2014.json: images[1] (id 4", "not in the split file dataset_coco.json"],
           read_coco, [train, val], tmp_path, karpathy_split=split_file)
    dataset = read_coco([train, val], tmp_path, karpathy_split=split_file, skip_invalid=True)
    assert len(dataset) == 4 and len(dataset.report.problems) == 1


# Flickr8k release -------------------------------------------------------------------------------------------


def flickr8k_folder(tmp_path: Path, lines=None, lists=None) -> Path:
    touch_images(tmp_path / "images")
    return write_flickr8k(tmp_path, lines, lists)


GOOD_LINES = [f"{name}#{k}\t{c}" for name in NAMES for k, c in enumerate(CAPTIONS[name])]


@pytest.mark.parametrize("bad_line, fragments", [
    ("b.jpg#2 no tab here", ["line 5", "no tab"]),
    ("b.jpg\tA caption without a number.", ["line 5", "expected '<image>#<n>'"]),
    ("b.jpg#x\tA caption.", ["line 5", "'b.jpg#x'"]),
    ("b.jpg#2\t   ", ["line 5 (b.jpg#2)", "empty caption"]),
    ("b.jpg#1\tThe same number again.", ["line 5 (b.jpg#1)", "duplicate caption b.jpg#1 (also line 4)"]),
])
def test_flickr8k_bad_lines(tmp_path, bad_line, fragments):
    lines = [*GOOD_LINES[:4], bad_line, *GOOD_LINES[4:]]  # after b.jpg#1: line 5
    token = flickr8k_folder(tmp_path, lines)
    raises(["Flickr8k.token.txt: ", *fragments], read_flickr8k, token)
    dataset = read_flickr8k(token, skip_invalid=True)
    assert len(dataset) == 3 and sum(len(r.captions) for r in dataset.records) == 6
    assert len(dataset.report.problems) == 1 and all(f in dataset.report.problems[0] for f in fragments)


def test_flickr8k_missing_image_and_blank_lines(tmp_path):
    token = flickr8k_folder(tmp_path, ["", *GOOD_LINES, "d.jpg#0\tA photo nobody kept.", ""],
                            {"train": ["a.jpg", "d.jpg"], "dev": ["b.jpg"], "test": ["c.jpg"]})
    raises(["Flickr8k.token.txt: image d.jpg (line 8)", "image file not found"], read_flickr8k, token)
    dataset = read_flickr8k(token, skip_invalid=True)
    assert [r.image_id for r in dataset.records] == NAMES and len(dataset.report.problems) == 1


def test_flickr8k_split_lists(tmp_path):
    token = flickr8k_folder(tmp_path, lists={"train": [], "dev": ["b.jpg"], "test": ["c.jpg", "x.jpg"]})
    raises(["Flickr_8k.testImages.txt: line 2 (x.jpg)", "has no captions in Flickr8k.token.txt"],
           read_flickr8k, token)
    dataset = read_flickr8k(token, skip_invalid=True)
    assert {r.image_id: r.split for r in dataset.records} == SPLIT_OF  # a.jpg is in no list: train
    assert len(dataset.report.problems) == 1

    write_flickr8k(tmp_path, lists={"train": ["a.jpg"], "dev": ["b.jpg", "c.jpg"], "test": ["c.jpg"]})
    raises(["Flickr_8k.testImages.txt: line 1 (c.jpg)", "listed twice (also Flickr_8k.devImages.txt: line 2)"],
           read_flickr8k, token)

    (tmp_path / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Flickr_8k.devImages.txt"):
        read_flickr8k(token)
    assert {r.split for r in read_flickr8k(token, split_files={}).records} == {"train"}
    custom = read_flickr8k(token, split_files={"test": tmp_path / "Flickr_8k.testImages.txt"})
    assert {r.image_id: r.split for r in custom.records} == {"a.jpg": "train", "b.jpg": "train", "c.jpg": "test"}


def test_image_folder_is_listed_once(tmp_path, monkeypatch):
    """Existence is checked against one listing per folder, not with a stat per image."""
    names = [f"{i:04d}.jpg" for i in range(200)]
    touch_images(tmp_path / "images", names)
    token = write_flickr8k(tmp_path, [f"{n}#0\tcaption of {n}" for n in names], {})
    listings, file_checks = [], []
    real_scandir, real_is_file = os.scandir, Path.is_file
    monkeypatch.setattr(os, "scandir", lambda path: listings.append(path) or real_scandir(path))
    monkeypatch.setattr(Path, "is_file", lambda self: file_checks.append(self) or real_is_file(self))
    assert len(read_flickr8k(token, split_files={})) == 200
    assert listings == [tmp_path / "images"] and len(file_checks) < 5


# One rule for reference captions, in every reader --------------------------------------------------------------

LONG_CAPTION = " ".join(["word"] * 10_000)


@pytest.mark.parametrize("caption, fragments", [
    ("", ["empty caption"]),
    ("  ", ["empty caption"]),
    ("... !!", ["caption '... !!' has no words (only punctuation or letters outside a-z)"]),
    ("\u3042\u3044", ["has no words"]),
    (LONG_CAPTION, ["has 10000 words, more than the 100 a reference caption may have; shorten it"]),
])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_caption_rule_for_every_reader(tmp_path, layout, caption, fragments):
    """What train used to drop and evaluate scored as an empty reference (punctuation only), and a 10,000-word
    reference that moved CIDEr-D by 13 points, are refused like "" by every reader, naming the entry; with
    skip_invalid they are left out and listed, the image's other captions kept."""
    touch_images(tmp_path / "images")
    captions = {name: list(texts) for name, texts in CAPTIONS.items()}
    captions["b.jpg"][1] = caption
    if layout == "karpathy":
        data = karpathy_data()
        data["images"][1]["sentences"][1]["raw"] = caption
        path, where = write_karpathy(tmp_path, data), "dataset_tiny.json: images[1] (imgid 1, 'b.jpg'): sentences[1]"
    elif layout == "coco":
        data = coco_data()
        data["annotations"][3]["caption"] = caption
        path, where = write_coco(tmp_path, data), "captions_val.json: annotations[3] (annotation 201)"
    else:
        lines = [f"{name}#{k}\t{c}" for name in NAMES for k, c in enumerate(captions[name])]
        path, where = write_flickr8k(tmp_path, lines), "Flickr8k.token.txt: line 4 (b.jpg#1)"
    if layout == "flickr8k" and not caption.strip():
        fragments = ["empty caption; fill it in or remove the line"]
    message = raises([where, *fragments], load_dataset, path, layout=layout)
    assert len(message) < 400  # the caption is quoted short
    dataset = load_dataset(path, layout=layout, skip_invalid=True)
    assert len(dataset.report.problems) == 1 and where in dataset.report.problems[0]
    record = next(r for r in dataset.records if r.image_id == "b.jpg")
    assert record.captions == [CAPTIONS["b.jpg"][0]]


def test_captions_at_the_word_limit_are_kept(tmp_path):
    from captioner.data.common import MAX_CAPTION_WORDS

    touch_images(tmp_path / "images")
    data = karpathy_data()
    data["images"][0]["sentences"][0]["raw"] = "a, " * MAX_CAPTION_WORDS  # punctuation does not count
    data["images"][1]["sentences"][0]["raw"] = "été !"  # a word the tokenizer keeps ("t")
    dataset = read_karpathy(write_karpathy(tmp_path, data))
    assert not dataset.report and sum(len(r.captions) for r in dataset.records) == 6
