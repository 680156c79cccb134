"""Reading a dataset: seconds to load Flickr8k from each of its three layouts (Karpathy JSON, COCO JSON,
the original token files), wall-clock and CPU time.

    python scripts/bench/reading.py [--data ../shared/data/flickr8k] [--repeats 3]

Each figure is the fastest of --repeats runs. Target (once an assertion in tests/test_data.py): under 2 s
of CPU time per layout.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from captioner.data import load_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = Path(os.environ.get("CAPTIONER_FLICKR8K", REPO_ROOT.parent / "shared" / "data" / "flickr8k"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the Flickr8k folder")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest counts")
    args = parser.parse_args(argv)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.data}")
    for layout in ("karpathy", "coco", "flickr8k"):
        wall, cpu = [], []
        for _ in range(args.repeats):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            dataset = load_dataset(args.data, layout=layout)
            wall.append(time.perf_counter() - start_wall)
            cpu.append(time.process_time() - start_cpu)
        print(f"{layout:<9} {len(dataset)} images: {min(wall):.2f} s wall, {min(cpu):.2f} s CPU "
              "(target < 2 s CPU)")


if __name__ == "__main__":
    main()
