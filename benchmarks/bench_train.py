"""Ours vs the tutorial pipeline, side by side in one process: same model, hyperparameters, 3000 SGD steps.

    python benchmarks/bench_train.py                 # logreg, tutorial settings
    python benchmarks/bench_train.py --model cnn --lr 0.01 --momentum 0.9 --iters 600

Prints both loop times (training + the periodic test evaluations), both accuracies and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from tutorial_baseline import tutorial_train

from mnist_jobs.config import TrainConfig
from mnist_jobs.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="logreg")
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="device for ours (the tutorial always runs on CPU)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each pipeline; medians are reported")
    args = p.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    cfg = TrainConfig(
        model=args.model,
        lr=args.lr,
        momentum=args.momentum,
        iters=args.iters,
        seed=args.seed,
        device=args.device,
    )
    bases, ours_runs = [], []
    for _ in range(args.repeat):  # interleaved, so background load hits both alike
        bases.append(
            tutorial_train(
                model=args.model, lr=args.lr, momentum=args.momentum, iters=args.iters, seed=args.seed
            )
        )
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            r = train(cfg, results_dir=tmp, progress=lambda p: None)
            r["wall_s"] = time.perf_counter() - t0
            r["loop_s"] = r["timings"]["train_s"] + r["timings"]["eval_s"]
            ours_runs.append(r)
    base = sorted(bases, key=lambda b: b["loop_s"])[len(bases) // 2]
    ours = sorted(ours_runs, key=lambda r: r["loop_s"])[len(ours_runs) // 2]
    ours_loop, ours_wall = ours["loop_s"], ours["wall_s"]
    print(
        "tutorial loop s:",
        " ".join(f"{b['loop_s']:.3f}" for b in bases),
        "| ours loop s:",
        " ".join(f"{r['loop_s']:.3f}" for r in ours_runs),
        "(medians below)",
    )
    rows = [
        ("tutorial (DataLoader + ToTensor)", base["loop_s"], base["setup_s"], base["test_accuracy"]),
        (
            f"mnist-jobs ({ours['env']['device']})",
            ours_loop,
            ours["timings"]["data_load_s"],
            ours["metrics"]["test_accuracy"],
        ),
    ]
    print(
        f"\n{args.model}, lr {args.lr}, momentum {args.momentum}, batch 100, {args.iters} iters, seed {args.seed}"
    )
    print(f"{'pipeline':36s} {'train+eval s':>12s} {'data s':>8s} {'test acc %':>10s}")
    for name, loop, setup, acc in rows:
        print(f"{name:36s} {loop:12.3f} {setup:8.3f} {acc:10.2f}")
    print(
        f"\nspeed-up (train+eval loop): {base['loop_s'] / ours_loop:.1f}x   "
        f"end to end incl. data: {(base['loop_s'] + base['setup_s']) / ours_wall:.1f}x   "
        f"accuracy difference: {ours['metrics']['test_accuracy'] - base['test_accuracy']:+.2f} points"
    )


if __name__ == "__main__":
    main()
