"""A wheel carries the shipped model: build the sdist, build the wheel from it (as `pip install sdist` and
`python -m build` do), install it into a fresh virtual environment, and caption the example photos from
a folder outside the repository. Offline throughout: no build isolation, no package index."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT

SHIPPED = REPO_ROOT / "checkpoints" / "flickr8k-cocotext-lite0" / "model.safetensors"
IN_WHEEL = "captioner/_checkpoints/flickr8k-cocotext-lite0/model.safetensors"
# What a checkout may hold beside the sources: build leftovers, caches, runs (never part of a build).
_NOT_SOURCES_ANYWHERE = shutil.ignore_patterns(".git", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
                                               "_checkpoints")
# Generated folders at the top of a checkout only: captioner/features/ is source, ./features/ a cache.
_NOT_SOURCES_AT_TOP = {"build", "dist", ".benchmarks", ".venv", "runs", "features", "cache", "outputs", "reports"}


def NOT_SOURCES(directory: str, names: list[str]) -> set[str]:  # noqa: N802 (a shutil.copytree ignore callable)
    ignored = set(_NOT_SOURCES_ANYWHERE(directory, names))
    if Path(directory).resolve() == REPO_ROOT.resolve():
        ignored |= _NOT_SOURCES_AT_TOP & set(names)
    return ignored


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _site_packages() -> list[str]:
    """The folders this interpreter imports installed packages from (pip's own included)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(str(Path(paths[key]).resolve()) for key in ("purelib", "platlib")))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_wheel_built_from_the_sdist_captions_from_any_folder(tmp_path):
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} is not in this checkout")
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCES)

    # The sdist through setuptools' PEP 517 hook (what `python -m build --sdist` calls), then the wheel from
    # the unpacked sdist: MANIFEST.in must carry the checkpoint for setup.py to package it.
    sdist_name = _run([sys.executable, "-c", "import sys, setuptools.build_meta as backend; "
                                             "print(backend.build_sdist(sys.argv[1]))", str(tmp_path / "sdist")],
                      cwd=source).strip().splitlines()[-1]
    with tarfile.open(tmp_path / "sdist" / sdist_name) as archive:
        # the "data" filter where this Python has it (3.10.12+, 3.11.4+): no links or paths out of the folder
        archive.extractall(tmp_path / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    unpacked = next((tmp_path / "unpacked").iterdir())
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
          "-w", str(tmp_path / "wheels"), str(unpacked)], cwd=tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("captioner-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert _sha256(archive.read(IN_WHEEL)) == _sha256(SHIPPED.read_bytes()), "the wheel's model differs"
        assert "captioner/_checkpoints/flickr8k-cocotext-lite0/MODEL_CARD.md" in archive.namelist()

    # A fresh environment that reuses torch & co. from the site-packages of the interpreter running the tests,
    # whether that is a system Python, a venv or conda. `--system-site-packages` would not do: from inside a
    # venv it exposes the base interpreter's packages, not the venv's. A .pth line adds those folders after
    # the new venv's own; the .pth files inside them (an editable captioner's finder) are not run, and the
    # test checks which captioner the venv imports anyway.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAPTIONER_CHECKPOINT")}
    venv_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=tmp_path, env=env).strip())
    (venv_site / "_outer_site_packages.pth").write_text("\n".join(_site_packages()) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", "--force-reinstall",
          str(wheel)], cwd=tmp_path, env=env)

    elsewhere = tmp_path / "elsewhere"  # not the checkout: no checkpoints/ folder around
    shutil.copytree(REPO_ROOT / "demo" / "examples", elsewhere / "photos")
    where = json.loads(_run([str(python), "-c", "import json, captioner, captioner.checkpoint as c; "
                                                "print(json.dumps([captioner.__file__, str(c.default_checkpoint_path())]))"],
                            cwd=elsewhere, env=env))
    site = (venv / "lib").resolve() if os.name != "nt" else (venv / "Lib").resolve()
    assert Path(where[0]).resolve().is_relative_to(site), f"the venv imported {where[0]}, not the wheel"
    assert Path(where[1]).resolve().is_relative_to(site) and where[1].endswith("_checkpoints/flickr8k-cocotext-lite0")

    command = venv / ("Scripts" if os.name == "nt" else "bin") / "captioner"
    _run([str(command), "caption", "photos", "--output", "captions.jsonl"], cwd=elsewhere, env=env)
    rows = [json.loads(line) for line in (elsewhere / "captions.jsonl").read_text().splitlines()]
    photos = sorted(p.name for p in (elsewhere / "photos").glob("*.jpg"))
    assert len(photos) == 4
    assert sorted(Path(row["image"]).name for row in rows) == photos
    assert all(not row.get("error") and len(row["caption"].split()) >= 3 for row in rows), rows
