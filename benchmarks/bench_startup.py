"""Whole processes, python start to exit: `mnist-jobs train` vs the tutorial script vs `import torch`.

    python benchmarks/bench_startup.py              # 5 interleaved rounds, medians and min-max
    python benchmarks/bench_startup.py --repeat 9

Each round runs, one after the other (so background load hits all alike):
  (a) python -c "import torch"                                   the floor any torch program pays
  (b) mnist-jobs train --device cpu --results-dir TMP            tutorial preset, the CLI as users run it
  (c) the tutorial pipeline (benchmarks/tutorial_baseline.py's tutorial_train(), the tutorials' code) as
      its own process: python -c "... tutorial_train() ..."
and prints each one's median and min-max wall time, the ratio (c)/(b), and what (b) adds above (a).
One untimed warm-up round comes first: it fills the page cache and lets the first `mnist-jobs` run
make the decoded MNIST cache that every later run loads (see mnist_jobs/data.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TUTORIAL = (
    "import sys; sys.path.insert(0, {here!r}); from tutorial_baseline import tutorial_train; "
    "r = tutorial_train(); print(f\"tutorial test accuracy {{r['test_accuracy']:.2f}}%\")"
)


def cli_command() -> list[str]:
    """The installed `mnist-jobs` entry point beside this python, else `python -m mnist_jobs`."""
    exe = Path(sys.executable).parent / "mnist-jobs"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mnist-jobs")
    return [found] if found else [sys.executable, "-m", "mnist_jobs"]


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return wall, p.stdout


def accuracy(out: str) -> str:
    m = re.search(r"test accuracy ([0-9.]+%)", out)
    return m.group(1) if m else "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5, help="timed rounds (default 5); medians are reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    args = p.parse_args()

    import torch  # only for the header line; the timed processes import their own

    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} cpus, "
        f"{torch.get_num_threads()} torch threads, {platform.machine()}"
    )
    cli = cli_command()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "a": ("python -c 'import torch'", lambda i: [sys.executable, "-c", "import torch"]),
            "b": (
                "mnist-jobs train --device cpu",
                lambda i: [*cli, "train", "--device", "cpu", "--results-dir", f"{tmp}/r{i}"],
            ),
            "c": ("tutorial script", lambda i: [sys.executable, "-c", TUTORIAL.format(here=str(HERE))]),
        }
        walls: dict[str, list[float]] = {k: [] for k in runs}
        accs: dict[str, str] = {}
        for i in range(args.warmup + args.repeat):
            for k, (_, cmd) in runs.items():  # interleaved: a, b, c, a, b, c, ...
                wall, out = timed(cmd(i))
                if i >= args.warmup:
                    walls[k].append(wall)
                    accs[k] = accuracy(out)
            if i >= args.warmup:
                print(
                    f"round {i - args.warmup + 1}: " + "  ".join(f"({k}) {walls[k][-1]:.2f} s" for k in runs)
                )

    med = {k: statistics.median(v) for k, v in walls.items()}
    print(
        f"\n{args.repeat} interleaved rounds after {args.warmup} warm-up; wall seconds, python start to exit"
    )
    print(f"{'':4}{'process':34}{'median':>8}{'min-max':>14}  test accuracy")
    for k, (label, _) in runs.items():
        acc = accs[k] if k != "a" else ""
        print(f"({k}) {label:34}{med[k]:8.2f}{min(walls[k]):7.2f}-{max(walls[k]):<6.2f}  {acc}")
    per_round = [c / b for b, c in zip(walls["b"], walls["c"], strict=True)]
    print(
        f"\nratio (c)/(b), tutorial / mnist-jobs: {med['c'] / med['b']:.2f}x of the medians "
        f"(per round {min(per_round):.2f}-{max(per_round):.2f}x)"
    )
    print(f"(b) - (a), mnist-jobs above a bare `import torch`: {med['b'] - med['a']:.2f} s")


if __name__ == "__main__":
    main()
