"""DDP on CPU: samples/s of 1 process vs 2 processes (gloo) for the same run, side by side.

    python benchmarks/bench_ddp.py                      # CNN and logreg, 600 iterations, batch 100
    python benchmarks/bench_ddp.py --models cnn --iters 300

Both go through the real launch path (submitit's LocalExecutor); threads are split so that
1 process x 2 threads and 2 processes x 1 thread use the same 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from mnist_jobs.config import TrainConfig
from mnist_jobs.job import TrainTask
from mnist_jobs.local import run_local


def one(model: str, iters: int, batch: int, tasks: int, tmp: Path) -> dict:
    cfg = TrainConfig(model=model, iters=iters, eval_every=iters, batch_size=batch, lr=0.01, device="cpu")
    out = tmp / f"{model}-{tasks}"
    task = TrainTask(
        configs=[cfg.to_dict()],
        run_ids=["r"],
        results_dir=str(out),
        threads=max(1, (os.cpu_count() or 1) // tasks),
    )
    states = run_local(out / "logs", [task], max_parallel=1, tasks_per_node=tasks)
    assert states == ["COMPLETED"], states
    return json.loads((out / "r.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn,logreg")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=100)
    args = p.parse_args()
    print(f"{os.cpu_count()} cpus; {args.iters} iterations, global batch {args.batch_size}")
    print(f"{'model':8s} {'procs':>5s} {'samples/s':>10s} {'train s':>8s} {'test acc %':>10s}")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            rates = {}
            for tasks in (1, 2):
                r = one(model, args.iters, args.batch_size, tasks, Path(tmp))
                rates[tasks] = r["timings"]["samples_per_s"]
                print(
                    f"{model:8s} {tasks:5d} {rates[tasks]:10.0f} {r['timings']['train_s']:8.2f} "
                    f"{r['metrics']['test_accuracy']:10.2f}"
                )
            print(f"{model:8s} 2-process speed-up: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
