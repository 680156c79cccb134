"""What `captioner caption PATH...` finds: every input that gives no image is an error row or, when the
inputs name no image at all, a one-line usage error; nothing is skipped silently."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from captioner.apps.cli import main
from captioner.apps.inputs import NoImagesError, expand_inputs


def photo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"photo")  # what helpers.FakeCaptioner captions
    return path


def rows(output: Path) -> dict[str, dict]:
    return {row["image"]: row for row in map(json.loads, output.read_text().splitlines())}


def deep_folder(top: Path, depth: int, name_length: int = 250) -> tuple[Path, int]:
    """Folders nested `depth` deep under `top`, each name `name_length` bytes, made through directory
    descriptors (their path is longer than a path call could take); an image file in every one of them.
    Returns the deepest folder's path and its length in bytes."""
    descriptor = os.open(top, os.O_RDONLY)
    path = top
    try:
        for level in range(depth):
            name = f"{level:03d}" + "d" * (name_length - 3)
            os.mkdir(name, dir_fd=descriptor)
            inner = os.open(name, os.O_RDONLY, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = inner
            path = path / name
            image = os.open("photo.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=descriptor)
            os.write(image, b"photo")
            os.close(image)
    finally:
        os.close(descriptor)
    return path, len(os.fsencode(str(path)))


# ------------------------------------------------------------------------------- folders that cannot be listed
def test_an_unlistable_sub_folder_is_an_error_row_not_a_silent_skip(tmp_path, fake_captioner, monkeypatch, capsys):
    """As root every folder is readable, so the refusal comes from os.scandir, as the kernel gives it to a user
    without permission (the next test does it with real permissions when not root)."""
    photo(tmp_path / "photos" / "a.jpg")
    locked = tmp_path / "photos" / "locked"
    photo(locked / "b.jpg")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    output = tmp_path / "out.jsonl"
    assert main(["caption", str(tmp_path / "photos"), "-r", "-o", str(output)]) == 1
    found = rows(output)
    assert found[str(locked)]["error"] == ("cannot list this folder (permission denied), so its images are not "
                                           "captioned: fix its permissions, then rerun with --resume")
    assert found[str(tmp_path / "photos" / "a.jpg")]["caption"] == "a photo of a"
    err = capsys.readouterr().err
    assert f"error: {locked}: cannot list this folder (permission denied)" in err
    assert "captioned 1 of 2 images; 1 failed" in err


def test_a_folder_without_read_permission_is_an_error_row(tmp_path):
    photo(tmp_path / "photos" / "a.jpg")
    locked = tmp_path / "photos" / "locked"
    photo(locked / "b.jpg")
    locked.chmod(0)
    try:
        try:
            os.listdir(locked)
        except PermissionError:
            pass
        else:
            pytest.skip("this process lists folders whatever their permissions (root); the test above refuses "
                        "the listing through os.scandir instead")
        scan = expand_inputs([str(tmp_path / "photos")], recursive=True)
    finally:
        locked.chmod(0o755)
    assert scan.paths == [str(tmp_path / "photos" / "a.jpg")]
    assert scan.problems == [(str(locked), "cannot list this folder (permission denied), so its images are not "
                                           "captioned: fix its permissions, then rerun with --resume")]


def test_paths_over_the_system_limit_are_error_rows(tmp_path, fake_captioner, capsys):
    limit = os.pathconf("/", "PC_PATH_MAX")
    top = tmp_path / "deep"
    top.mkdir()
    depth = (limit - len(str(top))) // 251 + 2  # the deepest folders' paths are over the limit
    deepest, length = deep_folder(top, depth)
    try:
        scan = expand_inputs([str(top)], recursive=True)
        # The walk lists every folder whose path the system takes and reports the first one it does not take.
        folder_lengths = [len(str(top)) + 251 * level for level in range(1, depth + 1)]
        listed = [n for n in folder_lengths if n < limit]
        unlisted = [(item, reason) for item, reason in scan.problems if reason.startswith("cannot list")]
        assert len(unlisted) == 1 and len(os.fsencode(unlisted[0][0])) == len(listed) * 251 + 251 + len(str(top))
        assert unlisted[0][1] == (f"cannot list this folder (its path is {len(os.fsencode(unlisted[0][0]))} bytes "
                                  f"long, over this system's limit of {limit}), so its images are not captioned: "
                                  "move it to a shorter path, then rerun with --resume")
        # A photo in a listed folder is captioned, or, when its own path is over the limit, an error row.
        unopened = [(item, reason) for item, reason in scan.problems if not reason.startswith("cannot list")]
        assert len(scan.paths) + len(unopened) == len(listed)
        assert len(scan.paths) == sum(n + len("/photo.jpg") < limit for n in listed)
        for item, reason in unopened:
            assert reason == (f"cannot be opened: its path is {len(os.fsencode(item))} bytes long, over this "
                              f"system's limit of {limit} (move or rename it to a shorter path)")

        # named directly: the same reason, not "no such file or folder"
        named = str(deepest / "photo.jpg")
        output = tmp_path / "out.jsonl"
        assert main(["caption", named, "-o", str(output)]) == 1
        assert rows(output)[named]["error"] == (f"cannot be opened: its path is {length + 10} bytes long, over this "
                                                f"system's limit of {limit} (move or rename it to a shorter path)")
        assert "no such file" not in capsys.readouterr().err
    finally:
        shutil.rmtree(top)  # fd-based: removes paths longer than a path call takes


def test_named_paths_that_are_missing_or_cannot_be_looked_at(tmp_path):
    photo(tmp_path / "a.jpg")
    scan = expand_inputs([str(tmp_path / "missing.jpg"), str(tmp_path / "a.jpg" / "inside.jpg"),
                          str(tmp_path / ("x" * 300))])
    assert scan.paths == []
    assert [reason for _, reason in scan.problems] == [
        "no such file or folder",
        "no such file or folder (a part of its path is a file, not a folder)",
        f"cannot be opened: a name in its path is over this system's limit of {os.pathconf('/', 'PC_NAME_MAX')} "
        "bytes (move or rename it to a shorter path)"]


# ------------------------------------------------------------------------------------- folders without images
@pytest.mark.parametrize("layout, flags, message", [
    ("empty", [], "no images found in {folder}"),
    ("only sub-folders", [], "no images found in {folder} (use -r for sub-folders)"),
    ("only sub-folders, none with images", ["-r"], "no images found in {folder} or its sub-folders"),
    ("only text files", [], "no images found in {folder} (its 2 files have no image extension)"),
])
def test_a_folder_without_images_is_a_usage_error(tmp_path, fake_captioner, capsys, layout, flags, message):
    folder = tmp_path / "photos"
    folder.mkdir()
    if layout.startswith("only sub-folders"):
        (folder / "2024").mkdir()
        (folder / "2025" / "empty").mkdir(parents=True)
        if "none" not in layout:
            photo(folder / "2024" / "a.jpg")
    if layout == "only text files":
        (folder / "notes.txt").write_text("x")
        (folder / "list.csv").write_text("x")
    output = tmp_path / "out.jsonl"
    assert main(["caption", str(folder), *flags, "-o", str(output)]) == 2
    assert capsys.readouterr().err == f"captioner caption: error: {message.format(folder=folder)}\n"
    assert not output.exists() and fake_captioner.seen == []
    with pytest.raises(NoImagesError):
        expand_inputs([str(folder)], "-r" in flags).require_images()


def test_an_empty_folder_beside_photos_is_an_error_row(tmp_path, fake_captioner, capsys):
    photo(tmp_path / "a.jpg")
    (tmp_path / "empty").mkdir()
    output = tmp_path / "out.jsonl"
    assert main(["caption", str(tmp_path / "a.jpg"), str(tmp_path / "empty"), "-o", str(output)]) == 1
    assert rows(output)[str(tmp_path / "empty")]["error"] == "no images found in this folder"
    assert "captioned 1 of 2 images; 1 failed" in capsys.readouterr().err
