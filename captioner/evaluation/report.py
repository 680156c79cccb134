"""A self-contained HTML report: corpus scores, then the best and worst captioned images.

Thumbnails are embedded as base64 JPEG data URIs, so the page can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from captioner.images import ImageLoadError, load_image
from captioner.utils import write_text_atomic

THUMBNAIL_SIZE = 256
_REQUIRED_KEYS = ("image_id", "image_path", "caption", "references", "cider")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table.scores { border-collapse: collapse; margin-bottom: 1.5em; }
table.scores th, table.scores td { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: left; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1em; }
.item { border: 1px solid #ddd; border-radius: 6px; padding: 0.8em; }
.item img, .missing { display: block; max-width: 256px; max-height: 256px; margin-bottom: 0.5em; }
.missing { width: 256px; height: 160px; background: #eee; color: #777; display: flex;
           align-items: center; justify-content: center; }
.caption { font-weight: 600; }
.score { color: #555; font-size: 0.9em; }
.references { font-size: 0.9em; color: #444; padding-left: 1.2em; }
"""


def thumbnail_data_uri(image_path: str | Path | None, max_size: int = THUMBNAIL_SIZE) -> str | None:
    """A `data:image/jpeg;base64,...` URI of the image shrunk to fit max_size, or None if it can't be read."""
    if image_path is None:
        return None
    try:  # the same safe loader as every door: pixel limit, EXIF orientation, RGB
        image = load_image(image_path, draft_size=max_size)
    except ImageLoadError:  # missing, unreadable, too large or not an image
        return None
    image.thumbnail((max_size, max_size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _check_items(items: Sequence[Mapping]) -> None:
    for index, item in enumerate(items):
        missing = [key for key in _REQUIRED_KEYS if key not in item]
        if missing:
            raise ValueError(f"report item {index} (image_id={item.get('image_id')!r}) lacks {missing}; "
                             f"each item needs {list(_REQUIRED_KEYS)}")
        if isinstance(item["references"], str):
            raise ValueError(f"report item {index} (image_id={item['image_id']!r}): references must be "
                             "a list of strings, not one string")


def _format_score(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else html.escape(str(value))


def _scores_table(scores: Mapping[str, object]) -> str:
    # Only plain numbers: a compute_scores() result also carries its "per_image" mapping.
    rows = [f"<tr><th>{html.escape(str(name))}</th><td>{_format_score(float(value))}</td></tr>"
            for name, value in scores.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if not rows:
        return "<p>No scores.</p>"
    return '<table class="scores">\n' + "\n".join(rows) + "\n</table>"


def _notes_table(notes: Mapping[str, object]) -> str:
    rows = [f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>"
            for key, value in notes.items()]
    return '<table class="scores">\n' + "\n".join(rows) + "\n</table>"


def _item_html(item: Mapping) -> str:
    data_uri = thumbnail_data_uri(item["image_path"])
    image_id = html.escape(str(item["image_id"]))
    if data_uri is None:
        picture = f'<div class="missing">image unavailable: {image_id}</div>'
    else:
        picture = f'<img src="{data_uri}" alt="{image_id}">'
    references = "".join(f"<li>{html.escape(str(r))}</li>" for r in item["references"])
    return (f'<div class="item">\n{picture}\n'
            f'<div class="caption">{html.escape(str(item["caption"]))}</div>\n'
            f'<div class="score">{image_id} &middot; CIDEr-D {_format_score(float(item["cider"]))}</div>\n'
            f'<ul class="references">{references}</ul>\n</div>')


def write_html_report(path: str | Path, items: Sequence[Mapping], title: str, scores: Mapping[str, object],
                      n: int = 12, *, notes: Mapping[str, object] | None = None) -> Path:
    """Write a self-contained HTML page and return its path.

    items: dicts {image_id, image_path, caption, references: list[str], cider: float}.
    scores: corpus scores to tabulate (e.g. the result of `metrics.compute_scores`; non-numbers skipped).
    n: how many best and how many worst images (by per-image CIDEr-D) to show.
    notes: optional run details to show under the scores (checkpoint, split, seed, decoding, ...).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    items = list(items)
    _check_items(items)
    by_cider = sorted(items, key=lambda item: float(item["cider"]), reverse=True)  # stable: ties keep order
    best = by_cider[:n]
    worst = sorted(items, key=lambda item: float(item["cider"]))[:n]

    title_html = html.escape(title)
    sections = [
        f"<h1>{title_html}</h1>",
        f"<p>{len(items)} images scored.</p>",
        "<h2>Corpus scores</h2>",
        _scores_table(scores),
    ]
    if notes:
        sections += ["<h2>Run</h2>", _notes_table(notes)]
    sections += [
        f'<h2 id="best">Best {len(best)} by CIDEr-D</h2>',
        '<div class="grid">\n' + "\n".join(_item_html(item) for item in best) + "\n</div>",
        f'<h2 id="worst">Worst {len(worst)} by CIDEr-D</h2>',
        '<div class="grid">\n' + "\n".join(_item_html(item) for item in worst) + "\n</div>",
    ]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{title_html}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(sections) + "\n</body>\n</html>\n")
    path = Path(path)
    write_text_atomic(path, page)
    return path
