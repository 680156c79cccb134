"""Training settings on the val split: several `captioner train` runs side by side, one table of results.

    python scripts/sweep_train.py --features runs/features-flickr8k-lite0 --out runs/sweep
    python scripts/sweep_train.py --features F --out runs/sweep --device cuda --parallel 8 --minutes 6
    python scripts/sweep_train.py --features F --out runs/sweep --set sizes --device cuda --parallel 8
    python scripts/sweep_train.py --features F --out runs/sweep --run wide "--hidden-dim 1024" --run base ""

Each run is `captioner train --data DATA --features F --out OUT/NAME ARGS --resume` in its own process
(so an interrupted sweep continues where it stopped). Without --run, a built-in list below (--set) is
swept, in that order. With --minutes, runs not yet started when the time is up are left out and runs still going are
stopped; their row shows the best epoch so far, marked "partial". The table (val, beam search as in
training: BLEU-4 and CIDEr-D ×100, best epoch, minutes) is printed after every finished run and saved to
OUT/sweep.json. Choices made from it are made on val; test is scored once, later, by `captioner evaluate`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

# name -> extra `captioner train` arguments; the defaults of TrainConfig/ModelConfig are the baseline.
# "one-at-a-time": each setting changed alone (docs/experiments.md, first GPU sweep).
# "sizes": wider decoders, alone and with the settings that helped in the first sweep (second GPU sweep).
WIDE = "--hidden-dim 1024 --image-dim 1024"
SETS = {
    "one-at-a-time": {
        "base": "",
        "base-seed1": "--seed 1",
        "hidden1024": "--hidden-dim 1024",
        "hidden1024-image1024": WIDE,
        "embed256": "--embed-dim 256",
        "image256": "--image-dim 256",
        "dropout0.3": "--dropout 0.3",
        "dropout0.65": "--dropout 0.65",
        "layers2": "--layers 2",
        "inject-first": "--image-input first",
        "lr1e-3": "--lr 1e-3",
        "lr4e-3": "--lr 4e-3",
        "smoothing0.2": "--label-smoothing 0.2",
        "epochs30": "--epochs 30 --patience 6",
        "batch64": "--batch-size 64",
        "minword3": "--min-word-count 3",
    },
    "sizes": {
        "h1024-i1024-seed1": f"{WIDE} --seed 1",
        "h1024-i1024-e256": f"{WIDE} --embed-dim 256",
        "h1024-i1024-e256-seed1": f"{WIDE} --embed-dim 256 --seed 1",
        "h1024-i1024-e256-bf16": f"{WIDE} --embed-dim 256 --amp bf16",
        "h1024-i1024-e256-ep12": f"{WIDE} --embed-dim 256 --epochs 12",
        "h768-i768-e256": "--hidden-dim 768 --image-dim 768 --embed-dim 256",
        "h768-i768": "--hidden-dim 768 --image-dim 768",
        "i1024": "--image-dim 1024",
        "h1024-i1024-drop0.65": f"{WIDE} --dropout 0.65",
        "h1024-i1024-e256-ls0.2": f"{WIDE} --embed-dim 256 --label-smoothing 0.2",
        "h1536-i1536-e256": "--hidden-dim 1536 --image-dim 1536 --embed-dim 256",
        "h1024-i1024-e256-b256": f"{WIDE} --embed-dim 256 --batch-size 256 --lr 3e-3",
        "e256-seed1": "--embed-dim 256 --seed 1",
        "e128": "--embed-dim 128",
        "h1024-i1024-e256-drop0.4": f"{WIDE} --embed-dim 256 --dropout 0.4",
        "h1024-i1024-e256-ep12-bf16-b256": f"{WIDE} --embed-dim 256 --epochs 12 --amp bf16 --batch-size 256 --lr 3e-3",
    },
}


def read_log(run_dir: Path) -> dict:
    """Best val epoch so far from a run's log.jsonl (empty when no epoch has finished)."""
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return {}
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    entries = [e for e in entries if "val" in e]
    if not entries:
        return {}
    best = max(entries, key=lambda e: e["val"]["CIDEr-D"])
    return {"epochs": len(entries), "best_epoch": best["epoch"], "BLEU-4": 100 * best["val"]["BLEU-4"],
            "CIDEr-D": 100 * best["val"]["CIDEr-D"]}


def table(rows: list[dict]) -> str:
    lines = [f"{'run':<22} {'BLEU-4':>6} {'CIDEr-D':>7} {'best/ran':>8} {'min':>5}  status    arguments"]
    for row in sorted(rows, key=lambda r: -r.get("CIDEr-D", -1)):
        scores = (f"{row['BLEU-4']:6.1f} {row['CIDEr-D']:7.1f} {row['best_epoch']:>4}/{row['epochs']:<3}"
                  if "CIDEr-D" in row else f"{'-':>6} {'-':>7} {'-':>8}")
        minutes = f"{row['seconds'] / 60:5.1f}" if "seconds" in row else f"{'-':>5}"
        lines.append(f"{row['name']:<22} {scores} {minutes}  {row['status']:<9} {row['args']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("CAPTIONER_FLICKR8K", "../shared/data/flickr8k"))
    parser.add_argument("--features", required=True, help="feature cache made by `captioner features`")
    parser.add_argument("--out", required=True, help="one run folder per setting goes in here")
    parser.add_argument("--set", default="one-at-a-time", choices=list(SETS), help="a built-in list of settings")
    parser.add_argument("--run", nargs=2, action="append", metavar=("NAME", "ARGS"),
                        help="a setting to try (repeatable), instead of --set")
    parser.add_argument("--only", help="comma-separated names from the list")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: CPU cores / --parallel)")
    parser.add_argument("--minutes", type=float, default=None, help="stop the sweep after this long")
    args = parser.parse_args()

    runs = dict(args.run) if args.run else dict(SETS[args.set])
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in runs]
        if unknown:
            parser.error(f"--only: unknown run(s) {unknown}; known: {', '.join(runs)}")
        runs = {n: runs[n] for n in args.only.split(",")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else None

    pending = list(runs.items())
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    rows: dict[str, dict] = {}

    def finish(name: str, status: str) -> None:
        process, started = running.pop(name)
        rows[name] = {"name": name, "args": runs[name], "status": status,
                      "seconds": time.monotonic() - started, **read_log(out / name)}
        print(f"\n[{time.strftime('%H:%M:%S')}] {name}: {status}\n{table(list(rows.values()))}", flush=True)
        (out / "sweep.json").write_text(json.dumps(list(rows.values()), indent=1))

    while pending or running:
        out_of_time = deadline is not None and time.monotonic() > deadline
        while pending and len(running) < args.parallel and not out_of_time:
            name, extra = pending.pop(0)
            command = [sys.executable, "-m", "captioner", "train", "--data", args.data, "--features",
                       args.features, "--out", str(out / name), "--device", args.device, "--resume",
                       *shlex.split(extra)]
            (out / name).mkdir(parents=True, exist_ok=True)
            with open(out / name / "stdout.txt", "a") as log:
                running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env),
                                 time.monotonic())
            print(f"[{time.strftime('%H:%M:%S')}] started {name}: {extra or '(defaults)'}", flush=True)
        for name, (process, _) in list(running.items()):
            if process.poll() is not None:
                finish(name, "done" if process.returncode == 0 else f"exit {process.returncode}")
            elif out_of_time:
                process.terminate()
                process.wait()
                finish(name, "partial")
        if out_of_time:
            for name, extra in pending:
                rows[name] = {"name": name, "args": extra, "status": "not run"}
            pending = []
        time.sleep(1)
    print(f"\nfinal\n{table(list(rows.values()))}")
    (out / "sweep.json").write_text(json.dumps(list(rows.values()), indent=1))
    return 0 if all(r["status"] == "done" for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
