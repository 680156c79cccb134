"""Start the captioner web demo: `python demo/app.py [--checkpoint PATH] [--host H] [--port P] [--share]
[--memory M]`.

The same as `captioner demo`; all logic lives in captioner.demo.
"""

from __future__ import annotations

import argparse

from captioner.demo import launch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Caption photos in the browser.")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file or folder (default: the shipped Flickr8k model)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; 0.0.0.0 makes the demo reachable from other machines")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--memory", default=None,
                        help="a caption memory (`captioner memory`): beam search re-ranks its candidates by consensus")
    args = parser.parse_args(argv)
    launch(args.checkpoint, host=args.host, port=args.port, share=args.share, memory=args.memory)


if __name__ == "__main__":
    main()
