"""Awkward and broken inputs through every door: the batch command, the demo, evaluation, the feature
cache; broken data files and checkpoints through the CLI; the demo under concurrent load and at its edges.

The bad-image corpus is built by tests/bad_image_corpus.py (`build_corpus`); the checkpoint is conftest's toy
one, so nothing here needs Flickr8k.
"""

from __future__ import annotations

import csv
import http.client
import json
import os
import pickle
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from bad_image_corpus import (
    SYMLINK_LOOP,
    build_corpus,
    exif_rotated_jpeg,
    format_table,
    judge,
    photo,
    read_rows,
    run_batch,
    shown,
)
from helpers import load_script
from PIL import Image
from safetensors.torch import save_file

from captioner.apps.cli import main
from captioner.apps.demo import EXAMPLES_DIR, example_paths, predict

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# gradio's queue calls pandas APIs that pandas 3 deprecates; not ours to fix. slow: the corpus, the toy
# captioner, the batch command in a subprocess and the demo server are module-wide costs.
pytestmark = [pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
              pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


load_demo = load_script("bench/load_demo.py")


def is_utf8(name: str) -> bool:
    """False for a file name whose bytes are not UTF-8 (Python holds those as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def plain(markdown: str) -> str:
    """Demo Markdown without its backslash escapes."""
    return markdown.replace("\\", "")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, build_corpus(folder)


@pytest.fixture(scope="module")
def toy_captioner(toy_checkpoint, one_torch_thread):
    from captioner.api import Captioner

    return Captioner.from_pretrained(toy_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def batch_run(corpus, toy_checkpoint, tmp_path_factory) -> dict:
    """The whole corpus through one `captioner caption --recursive` process."""
    folder, cases = corpus
    output = tmp_path_factory.mktemp("batch") / "results.jsonl"
    finished = run_batch(folder, toy_checkpoint, output, timeout=300)
    rows = read_rows(output)
    return {"finished": finished, "verdicts": judge(cases, rows, folder), "output": output,
            "by_name": {os.path.relpath(row["image"], folder): row for row in rows}}


def dataset_file(corpus: tuple[Path, list], path: Path, extra_entries: list[dict] | None = None) -> Path:
    """A Karpathy-format dataset whose test split is the corpus (file names that JSON can hold)."""
    folder, cases = corpus
    images = []
    for case in cases:
        if not is_utf8(case.name) or case.name == "broken-link.jpg":
            continue  # a name that is not UTF-8 cannot be in a JSON data file; a dangling link is no file at all
        filepath, filename = os.path.split(case.name)
        images.append({"filepath": filepath, "filename": filename, "imgid": len(images), "split": "test",
                       "sentences": [{"raw": f"a photo called {filename}"}]})
    for entry in extra_entries or []:
        images.append({**entry, "imgid": len(images)})
    path.write_text(json.dumps({"dataset": "corpus", "images": images}, ensure_ascii=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ the corpus
def test_batch_command_gives_every_input_a_caption_or_a_specific_error(batch_run, corpus, toy_checkpoint,
                                                                       capsys):
    folder, cases = corpus
    finished = batch_run["finished"]
    # Exit 1: some inputs failed (as they must); anything else, or a traceback, is a crash.
    assert finished.returncode == 1 and "Traceback" not in finished.stderr, finished.stderr[-3000:]
    # Each case exactly once, with its caption or the specific error, and nothing from outside the corpus.
    table = format_table(batch_run["verdicts"])
    assert all(ok for _, _, ok in batch_run["verdicts"]), table
    # The table a person reads: one line per input, odd names (not UTF-8, U+2028) escaped onto that line.
    assert len(table.splitlines()) == len(cases) + 2
    assert all(shown(case.name) in table for case in cases)
    # Every file exactly once: the symlink loop was not followed.
    assert set(batch_run["by_name"]) == {case.name for case in cases}
    for case in cases:
        row = batch_run["by_name"][case.name]
        if case.expect_error:
            assert row["caption"] is None and case.expect_error in row["error"], (case.name, row)
        else:
            assert row["caption"] and row["error"] is None, (case.name, row)

    # The output is never overwritten: without --resume the command refuses and leaves the file alone.
    before = batch_run["output"].read_bytes()
    assert main(["caption", str(folder), "--checkpoint", str(toy_checkpoint), "--output",
                 str(batch_run["output"])]) == 2
    assert "already exists" in capsys.readouterr().err
    assert batch_run["output"].read_bytes() == before


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_over_the_corpus_redoes_only_what_is_missing(batch_run, corpus, toy_checkpoint, tmp_path, suffix,
                                                            capsys):
    """Odd names (not UTF-8, U+2028, spaces) survive the round trip through a results file and --resume."""
    folder, cases = corpus
    output = tmp_path / f"results{suffix}"
    odd = [case.name for case in cases if not is_utf8(case.name) or "\u2028" in case.name]
    odd.append("name with spaces.jpg")
    args = ["caption", *(str(folder / name) for name in odd), "--checkpoint", str(toy_checkpoint),
            "--strategy", "greedy", "--output", str(output)]
    assert main(args) == 0
    written = output.read_bytes()
    last_row = written.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
    with open(output, "ab") as handle:  # as if killed half-way through writing one more row
        handle.write(last_row[: len(last_row) // 2])
    assert main([*args[:1], str(folder), "--recursive", *args[1 + len(odd):], "--resume"]) == 1
    assert f"resuming: {len(odd)} images already in" in capsys.readouterr().err
    final = output.read_bytes()
    assert final.startswith(written) and final.count(b"\n") == written.count(b"\n") + len(cases) - len(odd)
    if suffix == ".jsonl":
        images = [json.loads(line)["image"] for line in final.decode("utf-8").split("\n") if line]
    else:
        with open(output, encoding="utf-8", errors="surrogateescape", newline="") as handle:
            images = [row["image"] for row in csv.DictReader(handle)]
    assert sorted(os.path.relpath(image, folder) for image in images) == sorted(case.name for case in cases)


def test_demo_predict_gives_the_same_caption_or_a_friendly_message(batch_run, corpus, toy_captioner):
    folder, cases = corpus
    for case in cases:
        if case.name == "broken-link.jpg" or not is_utf8(case.name):
            continue  # an upload is always a real file with a UTF-8 name
        markdown, rows = predict(toy_captioner, str(folder / case.name), strategy="greedy", n_best=1)
        assert "Traceback" not in markdown
        if case.expect_error:
            assert rows == [] and markdown.startswith("### ⚠️"), (case.name, markdown)
            assert case.expect_error in plain(markdown) and Path(case.name).name in plain(markdown), markdown
            assert str(folder) not in plain(markdown)  # the server's folders stay private
        else:
            assert markdown.startswith("## ") and len(rows) == 1, (case.name, markdown)
            assert rows[0][1] == batch_run["by_name"][case.name]["caption"], case.name


def test_exif_rotated_photo_reaches_the_model_upright(tmp_path, toy_captioner):
    from captioner.features import encode_images
    from captioner.images import load_image

    # Landscape as stored; EXIF orientation 6 says "turn 90° clockwise to display".
    (tmp_path / "exif.jpg").write_bytes(exif_rotated_jpeg(photo(120, 64, seed=30)))
    with Image.open(tmp_path / "exif.jpg") as raw:  # the decoded pixels, as stored (PIL does not turn them)
        stored = raw.convert("RGB")
    stored.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "turned.png")  # the same turn, done by hand
    stored.save(tmp_path / "sideways.png")
    assert load_image(tmp_path / "exif.jpg").size == (64, 120)

    paths = [tmp_path / "exif.jpg", tmp_path / "turned.png", tmp_path / "sideways.png"]
    encoded = encode_images(paths, toy_captioner.encoder, batch_size=3)  # the batch door's route
    assert encoded.failures == []
    exif, turned, sideways = encoded.features
    assert torch.allclose(exif, turned, rtol=2e-3, atol=2e-3)  # the model sees the upright pixels
    assert not torch.allclose(exif, sideways, rtol=0.1, atol=0.1)
    # The demo's path (Captioner.caption -> load_image) turns it the same way.
    direct = toy_captioner.caption([str(paths[0]), str(paths[1])], strategy="greedy")
    assert direct[0].captions[0].log_prob == pytest.approx(direct[1].captions[0].log_prob, abs=1e-3)


def test_feature_cache_and_evaluate_report_broken_images_and_use_the_rest(corpus, toy_checkpoint, tmp_path,
                                                                        capsys):
    folder, cases = corpus
    clean = dataset_file(corpus, tmp_path / "dataset_corpus.json")
    name_of = {entry["imgid"]: os.path.join(entry["filepath"], entry["filename"])
               for entry in json.loads(clean.read_text(encoding="utf-8"))["images"]}
    in_data = set(name_of.values())
    good = {c.name for c in cases if c.name in in_data and not c.expect_error}
    bad = {c.name: c.expect_error for c in cases if c.name in in_data and c.expect_error}
    invalid_entries = [{"filename": "gone.jpg", "split": "test", "sentences": [{"raw": "a lost photo"}]},
                       {"filename": "empty.jpg", "split": "test", "sentences": [{"raw": "   "}]}]
    broken = dataset_file(corpus, tmp_path / "dataset_broken.json", invalid_entries)
    data = ["--images", str(folder)]

    # A data file with invalid entries: a specific error, exit 2, no traceback; --skip-invalid counts them.
    assert main(["features", "--data", str(broken), *data, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    last = len(in_data) + 1  # the second invalid entry; the reader stops at the first problem it meets
    assert f"dataset_broken.json: images[{last}] (imgid {last}, 'empty.jpg'): sentences[0]: empty caption" in err
    assert "Traceback" not in err and not (tmp_path / "never").exists()

    with pytest.warns(UserWarning, match=f"{len(bad)} image"):
        status = main(["features", "--data", str(broken), *data, "--out", str(tmp_path / "cache"),
                       "--skip-invalid", "--batch-size", "8"])
    assert status == 1  # the job ran, some images failed
    captured = capsys.readouterr()
    # The empty caption, then its image left without captions, then the missing image.
    assert "3 invalid entries skipped" in captured.err and "empty caption" in captured.err
    assert "gone.jpg" in captured.err and "image file not found" in captured.err
    assert f"{len(good)} image features" in captured.out
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["count"] == len(good)
    failed = {entry["image_id"]: entry for entry in meta["failed"]}
    assert set(failed) == set(bad)
    for name, reason in bad.items():
        assert reason in failed[name]["reason"] and failed[name]["path"] == str(folder / name)

    # evaluate, running the CNN: broken images reported with their reason, the rest scored.
    assert main(["evaluate", "--checkpoint", str(toy_checkpoint), "--data", str(clean), *data, "--split", "test",
                 "--strategy", "greedy", "--out", str(tmp_path / "eval")]) in (0, 1)
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["images"] == len(good) and len(report["skipped_images"]) == len(bad)
    for name, reason in bad.items():
        assert any(str(folder / name) in line and reason in line for line in report["skipped_images"]), name
        assert str(folder / name) in printed
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert {name_of[p["image_id"]] for p in predictions} == good and all(p["caption"] for p in predictions)
    assert (tmp_path / "eval" / "report.html").is_file()

    # evaluate from the cache: the same images, the same captions.
    assert main(["evaluate", "--checkpoint", str(toy_checkpoint), "--data", str(clean), *data, "--split", "test",
                 "--strategy", "greedy", "--features", str(tmp_path / "cache"), "--no-html",
                 "--out", str(tmp_path / "eval-cached")]) in (0, 1)
    cached = json.loads((tmp_path / "eval-cached" / "report.json").read_text())
    assert cached["images"] == len(good) and len(cached["skipped_images"]) == len(bad)
    assert json.loads((tmp_path / "eval-cached" / "predictions.json").read_text()) == predictions


def test_malformed_data_file_through_the_cli(tmp_path, capsys):
    path = tmp_path / "dataset_bad.json"
    path.write_text('{"images": [\n  {"filename": "a.jpg",}\n]}')
    assert main(["features", "--data", str(path), "--out", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "dataset_bad.json" in err and "line 2, column" in err and "Traceback" not in err
    path.write_text("[]")
    assert main(["features", "--data", str(path), "--layout", "karpathy", "--out", str(tmp_path / "cache"),
                 "--skip-invalid"]) == 2
    assert "top level is a list" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- checkpoints
class _RunsCode:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewritten(source: Path, target: Path, change) -> Path:
    from captioner.checkpoint import read_raw

    tensors, metadata = read_raw(source)
    change(tensors, metadata)
    save_file(tensors, str(target), metadata=metadata)
    return target


def _set_config(metadata: dict, **values) -> None:
    metadata["config"] = json.dumps({**json.loads(metadata["config"]), **values})


def _add_word(tensors: dict, metadata: dict) -> None:
    words = json.loads(metadata["vocab"])["words"] + ["zebra"]
    metadata["vocab"] = json.dumps({"words": words})
    _set_config(metadata, vocab_size=len(words))


BAD_CHECKPOINTS = {
    "truncated": ("truncated or corrupted", lambda good, path: path.write_bytes(good.read_bytes()[:5000])),
    "corrupted header": ("truncated or corrupted",
                         lambda good, path: path.write_bytes(good.read_bytes()[:8] + b"{\"x\": [1, 2" +
                                                             good.read_bytes()[19:])),
    "empty": ("truncated or corrupted", lambda good, path: path.write_bytes(b"")),
    "newer version": ("newer than this captioner", lambda good, path: _rewritten(
        good, path, lambda t, m: m.update(format_version="7"))),
    "config wrong types": ("hidden_dim", lambda good, path: _rewritten(
        good, path, lambda t, m: _set_config(m, hidden_dim="sixty-four"))),
    "vocab size mismatch": ("embedding has", lambda good, path: _rewritten(good, path, _add_word)),
    "torch.save archive": ("pickle", lambda good, path: torch.save({"w": torch.zeros(3)}, path)),
    "missing": ("no such checkpoint", lambda good, path: None),
}


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_through_the_caption_command(kind, toy_checkpoint, tmp_path, capsys):
    fragment, make = BAD_CHECKPOINTS[kind]
    bad = tmp_path / "model.safetensors"
    make(toy_checkpoint, bad)
    photo_file = tmp_path / "photo.jpg"
    photo().save(photo_file)
    assert main(["caption", str(photo_file), "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"captioner caption: error: {bad}: ") and fragment in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_pickle_that_would_run_code_is_refused_by_every_door(toy_checkpoint, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"model.embed.weight": _RunsCode(marker)}))
    photo_file = tmp_path / "photo.jpg"
    photo().save(photo_file)
    data = tmp_path / "dataset_one.json"
    data.write_text(json.dumps({"images": [{"filename": "photo.jpg", "split": "test", "imgid": 0,
                                            "sentences": [{"raw": "a photo"}]}]}))
    threads = torch.get_num_threads()  # `captioner demo` sets the thread count before loading
    try:
        for argv in (["caption", str(photo_file), "--checkpoint", str(evil)],
                     ["evaluate", "--checkpoint", str(evil), "--data", str(data), "--images", str(tmp_path)],
                     ["info", str(evil)],
                     ["demo", "--checkpoint", str(evil)]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert "pickle" in err and "never loads" in err and "Traceback" not in err, err
    finally:
        torch.set_num_threads(threads)
    assert not marker.exists()
    with open(evil, "rb") as handle:  # the payload is real: unpickling it does run the command
        monkeypatch.setattr(os, "system", lambda command: marker.write_text(command))
        pickle.load(handle)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------- demo
@pytest.fixture(scope="module")
def demo_url(toy_captioner):
    app, url = load_demo.start_demo(toy_captioner)
    yield url
    app.close()


def test_concurrent_requests_all_get_the_direct_caption(demo_url, toy_checkpoint, capsys):
    assert load_demo.main(["--url", demo_url, "--checkpoint", str(toy_checkpoint), "--requests", "10",
                           "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    assert "10 concurrent requests" in out and "10 correct" in out and "p50" in out and "p95" in out
    assert load_demo.main(["--url", "http://192.0.2.1:7860/", "--requests", "1"]) == 2  # not this machine
    assert load_demo.main(["--url", demo_url, "--requests", "100000"]) == 2  # unbounded: refused


def _get(url: str, path: str) -> tuple[int, bytes]:
    """A GET with the path sent exactly as written (no client-side normalisation of .. or %2F)."""
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_no_request_reads_files_outside_the_allowed_folders(demo_url, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-42")
    example = example_paths()[0].resolve()
    examples = EXAMPLES_DIR.resolve()
    up = "/".join([".."] * len(examples.parts))  # from the examples folder up to /
    relative_secret = str(secret).lstrip("/")
    status, body = _get(demo_url, f"/gradio_api/file={example}")
    assert status == 200 and body == example.read_bytes()  # the examples are served

    attempts = [
        f"/gradio_api/file={secret}",
        f"/gradio_api/file={str(secret).replace('/', '%2F')}",
        f"/gradio_api/file={examples}/{up}/{relative_secret}",
        f"/gradio_api/file={examples}/{up.replace('/', '%2F')}%2F{relative_secret.replace('/', '%2F')}",
        f"/gradio_api/file={examples}/{up.replace('..', '%2e%2e')}/{relative_secret}",
        f"/gradio_api/file={examples}/{up.replace('..', '%252e%252e')}/{relative_secret}",
        f"/gradio_api/file={examples}\\..\\..\\pyproject.toml",
        f"/gradio_api/file={examples}/../../pyproject.toml",
        f"/gradio_api/file={examples}/SOURCES.md",
        f"/gradio_api/file={example}%00.txt",
        "/gradio_api/file=pyproject.toml",
        "/gradio_api/file=demo/examples/../../pyproject.toml",
        "/gradio_api/file=..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=//etc/passwd",
        "/gradio_api/file=file:///etc/passwd",
        "/gradio_api/file=/proc/self/environ",
        "/file=/etc/passwd",
        "/static/../../../../etc/passwd",
        "/assets/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    ]
    for path in attempts:
        status, body = _get(demo_url, path)
        assert status in (403, 404), (path, status)
        assert b"TOP-SECRET" not in body and b"root:" not in body and b"[project]" not in body, path


def test_uploads_over_the_size_limit_are_refused_by_the_server(demo_url):
    import httpx

    from captioner.apps.demo import MAX_UPLOAD_BYTES

    too_big = b"\xff\xd8" + bytes(MAX_UPLOAD_BYTES)
    with httpx.Client(trust_env=False, timeout=30) as client:
        response = client.post(f"{demo_url}gradio_api/upload", files={"files": ("big.jpg", too_big, "image/jpeg")})
    assert response.status_code == 413, response.text[:200]


def test_bad_uploads_through_the_server_get_a_friendly_message(demo_url, corpus):
    from gradio_client import Client, handle_file

    folder, _ = corpus
    client = Client(demo_url, verbose=False, download_files=False, analytics_enabled=False)
    try:
        for name, reason in (("notes.jpg", "not an image"), ("bomb.png", "too many pixels")):
            markdown, table = client.predict(handle_file(str(folder / name)), "beam", 3, 1.0, 0, 3,
                                             api_name="/caption")
            assert markdown.startswith("### ⚠️") and reason in plain(markdown), markdown
            assert table["data"] == []
    finally:
        client.close()


def test_demo_binds_localhost_unless_told(demo_url, toy_captioner, monkeypatch):
    import gradio

    port = int(demo_url.rstrip("/").rsplit(":", 1)[1])
    listening = _listening_addresses(port)
    if listening is not None:  # Linux: what the kernel says the server is bound to
        assert listening == {"127.0.0.1"}, listening

    calls = []
    monkeypatch.setattr("captioner.api.Captioner.from_pretrained", lambda *args, **kwargs: toy_captioner)
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: calls.append(kwargs))
    threads = torch.get_num_threads()
    try:
        assert main(["demo"]) == 0
        assert main(["demo", "--host", "0.0.0.0", "--port", "7999"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert [(c["server_name"], c["share"]) for c in calls] == [("127.0.0.1", False), ("0.0.0.0", False)]
    assert calls[1]["server_port"] == 7999


def _listening_addresses(port: int) -> set[str] | None:
    """IPv4/IPv6 addresses with a listening TCP socket on `port`, from /proc/net (None when unavailable)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            return None
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            if width == 8:
                found.add(".".join(str(b) for b in raw[::-1]))
            else:  # four little-endian 32-bit words
                words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                found.add(":".join(b"".join(words).hex()[i:i + 4] for i in range(0, 32, 4)))
    return found


def test_corpus_images_are_what_they_claim(corpus):
    """The corpus itself: each good file really is the odd kind of image its case says."""
    folder, cases = corpus
    names = {case.name for case in cases}
    assert {"bomb.png", "cmyk.jpg", "deep.png", "animated.gif", "exif-rotated.jpg"} <= names
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    assert Image.open(folder / "deep.png").mode in ("I;16", "I")
    assert Image.open(folder / "animated.gif").n_frames == 3
    assert Image.open(folder / "palette.png").mode == "P" and "transparency" in Image.open(folder / "palette.png").info
    assert Image.open(folder / "really-a-jpeg.png").format == "JPEG"
    assert Image.open(folder / "panorama.png").size == (4000, 3)
    assert Image.open(folder / "exif-rotated.jpg").getexif()[0x0112] == 6
    assert (folder / "bomb.png").stat().st_size < 100
    assert (folder / SYMLINK_LOOP).resolve() == folder.resolve()
    assert np.asarray(Image.open(folder / "photo.webp")).shape == (64, 96, 3)
