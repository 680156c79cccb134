"""HTML report: embedded thumbnails, escaping, placeholders for unreadable images, best/worst order."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from captioner.evaluation.report import thumbnail_data_uri, write_html_report


@pytest.fixture
def items(tmp_path):
    colours = ["red", "green", "blue", "yellow", "purple"]
    items = []
    for index, colour in enumerate(colours):
        image_path = tmp_path / f"{colour}.jpg"
        Image.new("RGB", (640, 480), colour).save(image_path)
        items.append({"image_id": f"{colour}.jpg", "image_path": image_path,
                      "caption": f"caption {colour}", "references": [f"a {colour} square", "a flat colour"],
                      "cider": float(index)})  # purple best, red worst
    items.append({"image_id": "gone.jpg", "image_path": tmp_path / "gone.jpg",  # does not exist
                  "caption": "a <b>bold</b> & \"quoted\" claim", "references": ["x < y & z"], "cider": 2.5})
    not_an_image = tmp_path / "broken.jpg"
    not_an_image.write_bytes(b"this is not a jpeg")
    items.append({"image_id": "broken.jpg", "image_path": not_an_image, "caption": "caption broken",
                  "references": ["something"], "cider": 1.5})
    return items


def _write(tmp_path, items, n=12, **kwargs) -> str:
    scores = {"BLEU-1": 0.61234, "BLEU-4": 0.2, "CIDEr-D": 0.51, "ROUGE-L": 0.45, "per_image": {"x": {}}}
    path = write_html_report(tmp_path / "out" / "report.html", items, "Run <1> & co", scores, n=n, **kwargs)
    return path.read_text(encoding="utf-8")


def test_report_contains_scores_captions_and_thumbnails(tmp_path, items):
    page = _write(tmp_path, items)
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>Run &lt;1&gt; &amp; co</title>" in page
    for name, value in [("BLEU-1", "0.6123"), ("BLEU-4", "0.2000"), ("CIDEr-D", "0.5100"), ("ROUGE-L", "0.4500")]:
        assert f"<th>{name}</th><td>{value}</td>" in page
    assert "per_image" not in page
    for colour in ["red", "green", "blue", "yellow", "purple"]:
        assert f"caption {colour}" in page and f"a {colour} square" in page
    # 5 readable images, each shown in both sections (7 items <= n): 10 data URIs.
    assert page.count('src="data:image/jpeg;base64,') == 10
    assert "http://" not in page and "https://" not in page  # self-contained


def test_report_escapes_text(tmp_path, items):
    page = _write(tmp_path, items)
    assert "a &lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot; claim" in page
    assert "x &lt; y &amp; z" in page
    assert "<b>bold</b>" not in page


def test_missing_and_broken_images_get_placeholders(tmp_path, items):
    page = _write(tmp_path, items)
    assert "image unavailable: gone.jpg" in page
    assert "image unavailable: broken.jpg" in page


def test_thumbnails_are_small_jpegs(tmp_path, items):
    uri = thumbnail_data_uri(items[0]["image_path"])
    data = base64.b64decode(uri.removeprefix("data:image/jpeg;base64,"))
    with Image.open(io.BytesIO(data)) as thumbnail:
        assert thumbnail.format == "JPEG"
        assert max(thumbnail.size) <= 256
        assert thumbnail.size == (256, 192)  # aspect ratio kept
    assert thumbnail_data_uri(tmp_path / "nope.png") is None
    assert thumbnail_data_uri(None) is None


def captions(section: str) -> list[str]:
    return re.findall(r'<div class="caption">([^<]*)</div>', section)


def test_best_and_worst_ordering(tmp_path, items):
    page = _write(tmp_path, items, n=2)
    best = page[page.index('id="best"'):page.index('id="worst"')]
    worst = page[page.index('id="worst"'):]
    assert captions(best) == ["caption purple", "caption yellow"]
    assert captions(worst) == ["caption red", "caption green"]
    assert "Best 2 by CIDEr-D" in page and "Worst 2 by CIDEr-D" in page


def test_notes_and_bad_items(tmp_path, items):
    page = _write(tmp_path, items, notes={"seed": 42, "checkpoint": "runs/<a>"})
    assert "<th>seed</th><td>42</td>" in page and "runs/&lt;a&gt;" in page
    with pytest.raises(ValueError, match=r"report item 0 .* lacks \['cider'\]"):
        _write(tmp_path, [{"image_id": "a", "image_path": None, "caption": "c", "references": []}])
    with pytest.raises(ValueError, match="n must be at least 1"):
        _write(tmp_path, items, n=0)
