"""A whole local sweep command, CLI start to exit (worker processes included), vs the tutorial script
run once per config: the 24-config logreg grid (6 lr x 4 seeds, tutorial preset, 3000 iterations).

    python benchmarks/bench_sweep.py                 # 3 interleaved rounds, medians and min-max
    python benchmarks/bench_sweep.py --repeat 5 --no-unpacked

Each round runs, one after the other (so background load hits all alike):
  (a) mnist-jobs sweep --lr ... --seed 0,1,2,3 --pack 24 --device cpu     one task, one worker process
  (b) the same sweep unpacked (24 tasks, --max-parallel 1: one process per run)   [--no-unpacked: skip]
  (c) the tutorial pipeline as its own process (benchmarks/tutorial_baseline.py), once: x 24 is what
      running the tutorial script for each config costs (the 24 runs are alike; measured once a round)
and prints medians and min-max, (c) x 24 / (a), and (b) / (a). Every sweep gets a fresh results dir,
so nothing is skipped as done. One untimed warm-up (a 1-run sweep) fills the page cache first.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_startup import TUTORIAL, cli_command  # noqa: E402

GRID = ["--lr", "0.001,0.003,0.01,0.03,0.1,0.3", "--seed", "0,1,2,3", "--device", "cpu"]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return wall


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.2f} s  ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-unpacked", action="store_true", help="skip (b), the ~1 min unpacked sweep")
    args = p.parse_args()
    cli = cli_command()
    tutorial = [sys.executable, "-c", TUTORIAL.format(here=str(HERE))]
    times: dict[str, list[float]] = {"packed": [], "unpacked": [], "tutorial": []}
    with tempfile.TemporaryDirectory() as tmp:

        def sweep(tag: str, *extra: str) -> list[str]:
            out = Path(tmp) / f"{tag}-{len(os.listdir(tmp))}"
            return [*cli, "sweep", *GRID, *extra, "--name", "bench", "--results-dir", str(out)]

        timed([*cli, "sweep", "--lr", "0.01", "--device", "cpu", "--results-dir", str(Path(tmp) / "warm")])
        for r in range(args.repeat):
            times["packed"].append(timed(sweep("packed", "--pack", "24")))
            if not args.no_unpacked:
                times["unpacked"].append(timed(sweep("unpacked", "--max-parallel", "1")))
            times["tutorial"].append(timed(tutorial))
            print(
                f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v),
                flush=True,
            )
    print(f"\n{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"(a) sweep --pack 24, whole command     {fmt(times['packed'])}")
    if times["unpacked"]:
        print(f"(b) sweep unpacked, whole command      {fmt(times['unpacked'])}")
    print(
        f"(c) tutorial script, one process       {fmt(times['tutorial'])}   x 24 = {24 * statistics.median(times['tutorial']):.1f} s"
    )
    packed = statistics.median(times["packed"])
    print(f"tutorial x 24 / packed sweep: {24 * statistics.median(times['tutorial']) / packed:.1f}x")
    if times["unpacked"]:
        print(f"unpacked / packed sweep:      {statistics.median(times['unpacked']) / packed:.1f}x")


if __name__ == "__main__":
    main()
