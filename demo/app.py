"""Start the captioner web demo: `python demo/app.py [--checkpoint PATH] [--host H] [--port P] [--share]
[--memory M] [--rerank-neighbours N] [--rerank-candidates N] [--rerank-weight W]`.

Exactly `captioner demo`: the same entry point, so the same flags (`python demo/app.py --help`).
"""

from __future__ import annotations

import sys

from captioner.apps.cli import main as captioner_main


def main(argv: list[str] | None = None) -> int:
    return captioner_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
