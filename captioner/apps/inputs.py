"""What `captioner caption PATH...` is asked to caption: files, folders and glob patterns -> the image paths,
and every input that gives none, with the reason (each becomes an error row; nothing is skipped silently).

Folders contribute files with an image extension (sorted; sub-folders only with `recursive`, never following
symlinked folders, so a symlink loop cannot trap the walk). A named file is always tried, whatever its
extension. A folder that cannot be listed (permissions, a path longer than the system allows), a path that
cannot be looked at, and a path that is not a regular file (a named pipe, socket or device, which could block
the reader forever) become problems, and are never opened.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from captioner.images import not_a_regular_file
from captioner.utils import printable

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".heic",
                    ".heif", ".avif"}


class NoImagesError(ValueError):
    """The inputs name no image at all (only empty folders): a usage error, exit status 2."""


@dataclass
class InputScan:
    """The image paths to caption, in a stable order, and [(input, problem)] for what gives none. Unpacks
    as `paths, problems`."""

    paths: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    empty_folders: list[str] = field(default_factory=list)  # named folders without images (also in problems)

    def __iter__(self) -> Iterator:
        return iter((self.paths, self.problems))

    def require_images(self) -> InputScan:
        """Raise NoImagesError when the inputs were only folders without images; else return the scan."""
        if self.empty_folders and not self.paths and len(self.problems) == len(self.empty_folders):
            reasons = dict(self.problems)
            raise NoImagesError("; ".join(reasons[folder].replace("this folder", printable(folder), 1)
                                          for folder in self.empty_folders))
        return self


def expand_inputs(inputs: Iterable[str], recursive: bool = False) -> InputScan:
    """Files, folders and glob patterns -> an `InputScan` (see the module's docstring)."""
    scan = InputScan()
    found: list[str] = []
    for item in inputs:
        try:
            is_folder = stat.S_ISDIR(os.stat(item).st_mode)
        except OSError as error:
            if error.errno == errno.ENOENT and os.path.islink(item):
                found.append(item)  # a dangling symlink: reading it reports "file not found"
            elif error.errno == errno.ENOENT and glob.has_magic(item):
                found.extend(_glob(item, recursive, scan))
            else:
                scan.problems.append((item, path_problem(error, item)))
            continue
        if not is_folder:
            found.append(item)
            continue
        problems_before = len(scan.problems)
        images = _scan_folder(item, recursive, scan)
        if not images and len(scan.problems) == problems_before:  # (an unreadable folder is its own problem)
            scan.problems.append((item, _no_images_reason(item, recursive)))
            scan.empty_folders.append(item)
        found.extend(images)
    seen: set[str] = set()
    for path in found:
        if path in seen:
            continue
        seen.add(path)
        reason = _unusable(path)
        if reason is None:
            scan.paths.append(path)
        else:
            scan.problems.append((path, reason))
    return scan


def _glob(pattern: str, recursive: bool, scan: InputScan) -> list[str]:
    matches = sorted(glob.glob(pattern, recursive=recursive))
    if not matches:
        scan.problems.append((pattern, "no file matches this pattern"))
    found: list[str] = []
    for match in matches:
        found.extend(_scan_folder(match, recursive, scan) if os.path.isdir(match) else [match])
    return found


def _scan_folder(folder: str, recursive: bool, scan: InputScan) -> list[str]:
    """Image files in `folder` (and its sub-folders with `recursive`); a folder that cannot be listed is a
    problem of `scan`."""
    found = []

    def unreadable(error: OSError) -> None:
        where = error.filename if isinstance(error.filename, str) else folder
        scan.problems.append((where, folder_problem(error, where)))

    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=False):
        dirs.sort()
        if not recursive:
            dirs.clear()
        found.extend(os.path.join(root, name) for name in sorted(files)
                     if Path(name).suffix.lower() in IMAGE_EXTENSIONS)
    return found


def _no_images_reason(folder: str, recursive: bool) -> str:
    entries = list(os.scandir(folder))
    files = sum(entry.is_file() for entry in entries)
    others = f" (its {files} file{'s have' if files > 1 else ' has'} no image extension)" if files else ""
    if recursive:
        return f"no images found in this folder or its sub-folders{others}"
    if any(entry.is_dir(follow_symlinks=False) for entry in entries):
        return f"no images found in this folder{others} (use -r for sub-folders)"
    return f"no images found in this folder{others}"


def _unusable(path: str) -> str | None:
    """Why a found path cannot be read as a file (it cannot be looked at, or is not a regular file), or None."""
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ENOENT and os.path.islink(path):
            return None  # a dangling symlink: reading it reports "file not found"
        return path_problem(error, path)
    return not_a_regular_file(path)


def too_long(path: str) -> str:
    """Why the system refused `path` as too long (ENAMETOOLONG): the whole path, or one name in it."""
    length, limit = len(os.fsencode(path)), os.pathconf("/", "PC_PATH_MAX")
    if length >= limit:
        return f"its path is {length} bytes long, over this system's limit of {limit}"
    return f"a name in its path is over this system's limit of {os.pathconf('/', 'PC_NAME_MAX')} bytes"


def path_problem(error: OSError, path: str) -> str:
    """The reason a path (named on the command line, or found in a folder) cannot be looked at, with the fix."""
    if error.errno == errno.ENOENT:
        return "no such file or folder"
    if error.errno == errno.ENAMETOOLONG:
        return f"cannot be opened: {too_long(path)} (move or rename it to a shorter path)"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied: a folder on its path cannot be searched (check the folders' permissions)"
    if error.errno == errno.ENOTDIR:
        return "no such file or folder (a part of its path is a file, not a folder)"
    if error.errno == errno.ELOOP:
        return "too many levels of symbolic links (a symlink loop)"
    return f"cannot be looked at ({error.strerror or error})"


def folder_problem(error: OSError, folder: str) -> str:
    """The reason a folder cannot be listed (its images are not captioned), with the fix."""
    if error.errno in (errno.EACCES, errno.EPERM):
        reason, fix = "permission denied", "fix its permissions"
    elif error.errno == errno.ENAMETOOLONG:
        reason, fix = too_long(folder), "move it to a shorter path"
    else:
        reason, fix = error.strerror or str(error), "make it readable"
    return f"cannot list this folder ({reason}), so its images are not captioned: {fix}, then rerun with --resume"
