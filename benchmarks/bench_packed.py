"""Packed sweep vs the same runs one after another vs the tutorial pipeline, side by side in one process.

    python benchmarks/bench_packed.py                  # logreg 24-config grid + CNN 6-config grid
    python benchmarks/bench_packed.py --quick          # shorter runs, for a smoke test
    python benchmarks/bench_packed.py --models logreg --device cuda

logreg: lr 0.001,0.003,0.01,0.03,0.1,0.3 x seed 0-3 (24 configs), SGD, batch 100, 3000 iters, eval every
500 (the tutorial's settings). CNN: lr 0.01,0.05,0.1 x seed 0,1 (6 configs), SGD momentum 0.5, batch 100,
600 iters, eval every 200 (--quick: 600 / 100 iters). Rows (wall time for the whole grid):
  A packed, as its own process (python start-up, imports, data load, training: one sweep --pack task);
  B packed in this process, exact=True (each model's lone kernel calls: bit-identical to lone runs on
    CPU; the CPU default for the CNN);
  C packed in this process, exact=False (logreg: models sharing a seed share their batches' GEMMs - the
    logreg default everywhere; CNN: vmap / grouped convolutions - the GPU default);
  D unpacked: one process per config running `train()` (what a sweep task without --pack does);
  E unpacked: `train()` per config, one after another in this process (no start-up, warm caches);
  F tutorial: `tutorial_train` (DataLoader + ToTensor, CPU) on the first --tutorial-runs configs, the
    per-run time extrapolated to the grid (labelled so).
Accuracy agreement: every packed run's final test accuracy and history vs the same config alone (E).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from tutorial_baseline import tutorial_train

from mnist_jobs.config import TrainConfig
from mnist_jobs.train import train, train_pack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def grid(model: str, quick: bool, device: str) -> list[TrainConfig]:
    if model == "logreg":
        lrs, seeds, momentum = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3), (0, 1, 2, 3), 0.0
        iters, eval_every = (600, 200) if quick else (3000, 500)
    else:
        lrs, seeds, momentum = (0.01, 0.05, 0.1), (0, 1), 0.5
        iters, eval_every = (100, 50) if quick else (600, 200)
    return [
        TrainConfig(
            model=model, lr=lr, momentum=momentum, seed=s, iters=iters, eval_every=eval_every, device=device
        )
        for lr in lrs
        for s in seeds
    ]


def quiet(_p) -> None:
    pass


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_one_job(spec_path: str) -> None:
    """One unpacked run as its own process: what a sweep task without --pack does (a fresh Python,
    `import mnist_jobs`, `train(config)`)."""
    with open(spec_path) as f:
        spec = json.load(f)
    train(TrainConfig.from_dict(spec["config"]), results_dir=spec["results_dir"], progress=quiet)


def run_packed_job(spec_path: str) -> None:
    """The packed job as its own process (what one `sweep --pack` task does)."""
    with open(spec_path) as f:
        spec = json.load(f)
    cfgs = [TrainConfig.from_dict(c) for c in spec["configs"]]
    train_pack(cfgs, results_dir=spec["results_dir"], run_ids=spec["run_ids"], progress=quiet)


def bench(model: str, args) -> None:
    configs = grid(model, args.quick, args.device)
    c0 = configs[0]
    n = len(configs)
    ids = [f"r{i}" for i in range(n)]
    print(
        f"\n=== {model}: {n} configs (lr {sorted({c.lr for c in configs})} x seeds "
        f"{sorted({c.seed for c in configs})}), momentum {c0.momentum}, batch {c0.batch_size}, "
        f"{c0.iters} iters, eval every {c0.eval_every}, device {args.device} ===",
        flush=True,
    )
    rows: list[tuple[str, str, float, str]] = []  # (key, label, wall s for the grid, note)

    def row(key: str, label: str, wall: float, note: str = "measured") -> None:
        rows.append((key, label, wall, note))
        print(f"  {label}: {wall:.2f} s ({note})", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "spec.json")
        with open(spec, "w") as f:
            json.dump(
                {
                    "configs": [c.to_dict() for c in configs],
                    "run_ids": ids,
                    "results_dir": os.path.join(tmp, "proc"),
                },
                f,
            )
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        _, wall = timed(
            lambda: subprocess.run([sys.executable, __file__, "--packed-job", spec], check=True, env=env)
        )
        row("A", "packed: 1 process (python start, imports, data, training)", wall)

        packed, wall = timed(
            lambda: train_pack(
                configs, results_dir=os.path.join(tmp, "p"), run_ids=ids, progress=quiet, exact=True
            )
        )
        row("B", "packed: in this process, exact", wall)
        batched, wall = timed(
            lambda: train_pack(
                configs, results_dir=os.path.join(tmp, "q"), run_ids=ids, progress=quiet, exact=False
            )
        )
        row("C", "packed: in this process, batched / seed-grouped", wall)

        k = args.process_runs if args.process_runs is not None else (3 if args.quick else n)
        k = max(1, min(k, n))
        t0 = time.perf_counter()
        for i, cfg in enumerate(configs[:k]):
            one = os.path.join(tmp, f"one{i}.json")
            with open(one, "w") as f:
                json.dump({"config": cfg.to_dict(), "results_dir": os.path.join(tmp, "one")}, f)
            cmd = [sys.executable, __file__, "--one-job", one]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        wall = (time.perf_counter() - t0) / k * n
        row(
            "D",
            f"unpacked: {n} processes, one train() each",
            wall,
            "measured" if k == n else f"extrapolated from {k}",
        )

        alone, wall = timed(
            lambda: [
                train(c, results_dir=os.path.join(tmp, "a"), run_id=i, progress=quiet)
                for c, i in zip(configs, ids)
            ]
        )
        row("E", f"unpacked: {n} x train() in this process", wall)

    k = min(args.tutorial_runs, n)
    if k:
        tut, wall = timed(
            lambda: [
                tutorial_train(
                    model=model,
                    lr=c.lr,
                    momentum=c.momentum,
                    seed=c.seed,
                    iters=c.iters,
                    batch_size=c.batch_size,
                    eval_every=c.eval_every,
                )
                for c in configs[:k]
            ]
        )
        row("F", f"tutorial: {n} x tutorial_train() in this process", wall / k * n, f"extrapolated from {k}")

    wall_of = {key: w for key, _, w, _ in rows}
    print(f"\n{'':2s}{'pipeline':58s} {'grid s':>8s} {'per run s':>9s}  note")
    for key, label, wall, note in rows:
        print(f"{key:2s}{label:58s} {wall:8.2f} {wall / n:9.3f}  {note}")
    pairs = [
        ("D", "A", "processes: unpacked / packed"),
        ("E", "B", "in-process: unpacked / packed exact"),
        ("E", "C", "in-process: unpacked / packed batched"),
        ("F", "B", "tutorial / packed exact"),
        ("F", "C", "tutorial / packed batched"),
        ("F", "A", "tutorial / packed process"),
    ]
    print(
        "speed-ups: "
        + "; ".join(
            f"{name} ({a}/{b}) {wall_of[a] / wall_of[b]:.1f}x"
            for a, b, name in pairs
            if a in wall_of and b in wall_of
        )
    )

    def final(recs):
        return [r["metrics"]["test_accuracy"] for r in recs]

    same = sum(p["metrics"]["history"] == a["metrics"]["history"] for p, a in zip(packed, alone))
    d_exact = max(abs(p - a) for p, a in zip(final(packed), final(alone)))
    d_batched = max(abs(p - a) for p, a in zip(final(batched), final(alone)))
    print(
        f"accuracy vs alone (final test accuracy, max |diff| over {n}): exact {d_exact:.2f} points "
        f"(identical histories {same}/{n}); batched {d_batched:.2f} points; "
        f"accuracies {min(final(packed)):.2f}..{max(final(packed)):.2f}%"
    )
    if k:
        print(
            "tutorial accuracies (first configs): "
            + ", ".join(f"{r['test_accuracy']:.2f}" for r in tut)
            + "; packed: "
            + ", ".join(f"{a:.2f}" for a in final(packed)[:k])
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    p.add_argument("--models", default="logreg,cnn")
    p.add_argument("--device", default="cpu", help="device for packed and unpacked (tutorial: CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--tutorial-runs", type=int, default=2, help="tutorial runs to extrapolate from")
    p.add_argument(
        "--process-runs",
        type=int,
        default=None,
        help="one-run processes to time (default: all, 3 with --quick; fewer = extrapolated)",
    )
    p.add_argument("--packed-job", help=argparse.SUPPRESS)
    p.add_argument("--one-job", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.packed_job:
        run_packed_job(args.packed_job)
        return
    if args.one_job:
        run_one_job(args.one_job)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"load average {load:.2f} at start"
    )
    for model in args.models.split(","):
        bench(model.strip(), args)


if __name__ == "__main__":
    main()
