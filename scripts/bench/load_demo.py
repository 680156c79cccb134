"""Send concurrent caption requests to the web demo on this machine and check every answer.

    python scripts/bench/load_demo.py [--checkpoint PATH] [--requests 20] [--url http://127.0.0.1:7860/]

Without --url the script starts the demo itself on 127.0.0.1 (a free port) and stops it at the end; with
--url it targets a demo already running on this machine (`captioner demo --checkpoint PATH`, same
checkpoint). Other hosts are refused. All requests go out at once through gradio_client, each uploading one
of the example photos for greedy decoding; the script waits at most --timeout seconds, cancels whatever is
left, prints latency p50 / p95 and checks that every response carries the caption `predict` gives for that
photo when called directly. When it started the demo itself, it also prints the batches the demo served
them in (the demo captions simultaneous requests together, captioner.apps.demo.BatchedPredictor).

Exit status: 0 every request answered with the right caption; 1 otherwise; 2 bad usage.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_REQUESTS = 200


@dataclass
class Response:
    image: Path
    seconds: float | None = None  # from sending to the answer; None when there was none
    caption: str | None = None
    error: str | None = None


def _keep_local_traffic_local() -> None:
    # gradio_client and gradio's own start-up check use httpx, which honours proxy variables.
    for variable in ("NO_PROXY", "no_proxy"):
        os.environ[variable] = ",".join(filter(None, [os.environ.get(variable), "127.0.0.1", "localhost"]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_demo(captioner: Any, examples_dir: str | Path | None = None, predictor: Any = None) -> tuple[Any, str]:
    """Serve the demo for a loaded Captioner on 127.0.0.1 in this process: (app, url); `app.close()` stops it.
    `predictor`: the Caption button's handler (a captioner.apps.demo.BatchedPredictor; default: the demo's own)."""
    from captioner.apps.demo import EXAMPLES_DIR, build_app, serve

    _keep_local_traffic_local()
    examples_dir = EXAMPLES_DIR if examples_dir is None else examples_dir
    app = build_app(captioner, examples_dir, predictor=predictor)
    port = _free_port()
    serve(app, host="127.0.0.1", port=port, examples_dir=examples_dir, prevent_thread_lock=True)
    return app, f"http://127.0.0.1:{port}/"


def expected_captions(captioner: Any, images: list[Path]) -> dict[Path, str]:
    """The greedy caption `predict` gives for each image, called directly (no server)."""
    from captioner.apps.demo import predict

    expected = {}
    for image in images:
        _, rows = predict(captioner, str(image), strategy="greedy", n_best=1)
        if not rows:
            raise ValueError(f"{image}: predict gave no caption; use photos the demo can caption")
        expected[image] = rows[0][1]
    return expected


def send_requests(url: str, images: list[Path], count: int, timeout: float) -> list[Response]:
    """`count` caption requests sent at once (image i is images[i % len(images)]); waits at most `timeout`
    seconds in all, then cancels the rest."""
    from gradio_client import Client, handle_file

    if urlparse(url).hostname not in LOCAL_HOSTS:
        raise ValueError(f"{url}: the load script only talks to a demo on this machine ({', '.join(LOCAL_HOSTS)})")
    if not 1 <= count <= MAX_REQUESTS:
        raise ValueError(f"--requests {count}: choose 1..{MAX_REQUESTS}")
    _keep_local_traffic_local()
    client = Client(url, max_workers=count, verbose=False, download_files=False, analytics_enabled=False)
    responses = [Response(images[i % len(images)]) for i in range(count)]
    jobs = []
    try:
        for response in responses:
            sent = time.perf_counter()
            job = client.submit(handle_file(str(response.image)), "greedy", 1, 1.0, 0, 1, api_name="/caption")

            def record(_job, response=response, sent=sent) -> None:
                response.seconds = time.perf_counter() - sent

            job.add_done_callback(record)
            jobs.append(job)
        wait(jobs, timeout=timeout)
        for job, response in zip(jobs, responses, strict=True):
            if not job.done():
                job.cancel()
                response.seconds, response.error = None, f"no answer within {timeout:.0f} s"
            elif job.exception() is not None:
                response.error = f"{type(job.exception()).__name__}: {job.exception()}"
            else:
                response.caption = _caption_of(job.result())
                if response.caption is None:
                    response.error = f"no caption in the answer: {str(job.result())[:200]}"
    finally:
        client.close()
    return responses


def _caption_of(result: Any) -> str | None:
    """The best caption in a /caption answer: (markdown, {"headers": [...], "data": [[rank, caption, ...]]})."""
    try:
        table = result[1]
        rows = table["data"] if isinstance(table, dict) else table
        return str(rows[0][1])
    except (IndexError, KeyError, TypeError):
        return None


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction in 0..1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def report(responses: list[Response], expected: dict[Path, str], wall_seconds: float) -> tuple[str, int]:
    """(summary text, number of wrong or missing answers)."""
    wrong = [r for r in responses if r.error is not None or r.caption != expected[r.image]]
    latencies = [r.seconds for r in responses if r.seconds is not None and r.error is None]
    lines = [f"{len(responses)} concurrent requests in {wall_seconds:.1f} s: {len(responses) - len(wrong)} correct, "
             f"{len(wrong)} wrong or missing"]
    if latencies:
        lines.append(f"latency p50 {percentile(latencies, 0.5):.2f} s, p95 {percentile(latencies, 0.95):.2f} s, "
                     f"max {max(latencies):.2f} s")
    for response in wrong[:10]:
        got = response.error or f"caption {response.caption!r}, expected {expected[response.image]!r}"
        lines.append(f"  {response.image.name}: {got}")
    return "\n".join(lines), len(wrong)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--url", default=None, help="a demo already running on this machine (default: start one)")
    parser.add_argument("--requests", type=int, default=20, help=f"how many, all at once (1..{MAX_REQUESTS})")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for all answers")
    parser.add_argument("--images", default=None, help="folder of photos to send (default: demo/examples)")
    args = parser.parse_args(argv)
    if args.url and urlparse(args.url).hostname not in LOCAL_HOSTS:
        print(f"load_demo: {args.url}: only a demo on this machine can be targeted", file=sys.stderr)
        return 2
    if not 1 <= args.requests <= MAX_REQUESTS:
        print(f"load_demo: --requests must be 1..{MAX_REQUESTS}", file=sys.stderr)
        return 2

    from captioner.api import Captioner
    from captioner.apps.demo import EXAMPLES_DIR, BatchedPredictor, example_paths

    images = example_paths(args.images or EXAMPLES_DIR)
    if not images:
        print(f"load_demo: no photos in {args.images or EXAMPLES_DIR}", file=sys.stderr)
        return 2
    try:
        captioner = Captioner.from_pretrained(args.checkpoint, device="cpu")
        expected = expected_captions(captioner, images)
    except ValueError as error:  # CheckpointError, ImageLoadError, a wrong encoder: all name the file
        print(f"load_demo: {error}", file=sys.stderr)
        return 2
    predictor = None if args.url else BatchedPredictor(captioner)
    app, url = (None, args.url) if args.url else start_demo(captioner, predictor=predictor)
    try:
        started = time.perf_counter()
        responses = send_requests(url, images, args.requests, args.timeout)
        summary, wrong = report(responses, expected, time.perf_counter() - started)
    finally:
        if app is not None:
            app.close()
    print(summary)
    if predictor is not None:
        sizes, seconds = predictor.batcher.batch_sizes, predictor.batcher.batch_seconds
        print(f"served in {len(sizes)} batches of {sizes} photos, captioning {sum(seconds):.2f} s in all "
              f"({', '.join(f'{s:.2f}' for s in seconds)} s)")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
