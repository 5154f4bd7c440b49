"""How fast is `mnist-jobs report` on a big results folder? (Issue 5: 10 000 files in under 2 s.)

    python benchmarks/bench_report.py                      # 10 000 files in 10 sweep folders
    python benchmarks/bench_report.py --files 2000 --keep /tmp/many-results

One short real training run gives a template result; the folder is filled with copies of it whose config
(model × optimizer × lr × momentum × seed, one sweep folder per batch size/iters combination) and
metrics (accuracy, losses, history, timings) vary, each sweep with a sweep.json manifest naming its runs
plus a few that never finished (pending). Then it times, on the warm page cache:

  * end to end: `python -m mnist_jobs report DIR` (and `--format csv`, `--no-group --format csv`) in a
    fresh subprocess, so Python start-up and imports count;
  * in process: make_report (scan + parse + group + sort) and build_table + rendering to a string.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mnist_jobs.config import TrainConfig


def template_result(work: Path) -> dict:
    """A real result file from a short real run (history of 6 evaluations, like a default run)."""
    from mnist_jobs.train import train

    cfg = TrainConfig(iters=120, eval_every=20, device="cpu", seed=0)
    train(cfg, results_dir=work, run_id="template", progress=lambda p: None)
    return json.loads((work / "template.json").read_text())


def populate(root: Path, template: dict, n_files: int, n_sweeps: int = 10, seed: int = 0) -> int:
    """Write n_files result records into n_sweeps sweep folders (plus manifests); returns files written."""
    rng = random.Random(seed)
    grid = [
        (model, opt, lr, mom)
        for model in ("logreg", "cnn")
        for opt in ("sgd", "adam")
        for lr in (0.001, 0.003, 0.01, 0.03, 0.1)
        for mom in (0.0, 0.9)
    ]  # 40 configurations per sweep
    per_sweep = n_files // n_sweeps
    written = 0
    for s in range(n_sweeps):
        folder = root / f"sweep-{s:02d}"
        folder.mkdir(parents=True)
        batch_size, iters = (50, 100, 200)[s % 3], (1000, 3000)[s % 2]
        manifest_runs = {}
        count = per_sweep if s < n_sweeps - 1 else n_files - written
        for i in range(count):
            model, opt, lr, mom = grid[i % len(grid)]
            seed_ = i // len(grid)
            cfg = TrainConfig(
                model=model,
                optimizer=opt,
                lr=lr,
                momentum=mom,
                batch_size=batch_size,
                iters=iters,
                seed=seed_,
            ).to_dict()
            run_id = f"{model}-s{s:02d}-{i:05d}"
            rec = copy.deepcopy(template)
            base = 97.0 if model == "cnn" else 90.0
            acc = round(base - 3 * abs(lr - 0.01) * 10 + rng.gauss(0, 0.4), 4)
            rec.update(run_id=run_id, config=cfg)
            rec["status"] = "failed" if rng.random() < 0.01 else "completed"
            rec["metrics"]["test_accuracy"] = acc
            rec["metrics"]["test_loss"] = round(0.3 + rng.random() * 0.05, 6)
            history = rec["metrics"]["history"]
            for j, h in enumerate(history):
                h["iteration"] = (j + 1) * iters // len(history)
                h["test_accuracy"] = round(acc - (len(history) - 1 - j) ** 1.5, 4)
            rec["timings"]["train_s"] = round(rng.uniform(5, 60), 4)
            (folder / f"{run_id}.json").write_text(json.dumps(rec, indent=2) + "\n")
            manifest_runs[run_id] = {
                "config": cfg,
                "job_id": f"{1000 + s}_{i}",
                "submitted_at": rec["started_at"],
            }
            written += 1
        for k in range(5):  # submitted, never finished
            manifest_runs[f"pending-{s:02d}-{k}"] = {"config": cfg, "job_id": f"{1000 + s}_{count + k}"}
        manifest = {
            "kind": "mnist-jobs/sweep",
            "schema_version": 1,
            "name": folder.name,
            "executor": "slurm",
            "grid": {"model": ["logreg", "cnn"], "optimizer": ["sgd", "adam"], "lr": [0.001, 0.1]},
            "runs": manifest_runs,
        }
        (folder / "sweep.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return written


def timed_cli(args: list[str], repeat: int) -> tuple[list[float], str]:
    times, out = [], ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-m", "mnist_jobs", "report", *args], capture_output=True, text=True
        )
        times.append(time.perf_counter() - t0)
        if p.returncode != 0:
            sys.exit(f"report failed ({p.returncode}): {p.stderr}")
        out = p.stdout
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--sweeps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="write the folder here (must not exist) and keep it")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp) / "results"
        t0 = time.perf_counter()
        template = template_result(Path(tmp) / "template")
        n = populate(root, template, args.files, args.sweeps)
        size = sum(f.stat().st_size for f in root.rglob("*.json"))
        print(
            f"{n} result files + {args.sweeps} manifests, {size / 1e6:.1f} MB, written in "
            f"{time.perf_counter() - t0:.1f} s; {os.cpu_count()} cpus, Python {sys.version.split()[0]}"
        )

        print(f"\nend to end (subprocess, best / median of {args.repeat}):")
        for extra in ([], ["--format", "csv"], ["--no-group", "--format", "csv"]):
            times, out = timed_cli([str(root), *extra], args.repeat)
            label = " ".join(["mnist-jobs report DIR", *extra])
            print(
                f"  {label:48s} {min(times):6.3f} s  {statistics.median(times):6.3f} s  "
                f"({len(out.splitlines())} lines out)"
            )
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import mnist_jobs.cli"], check=True)
        print(f"  {'(python start-up + import mnist_jobs.cli)':48s} {time.perf_counter() - t0:6.3f} s")

        from rich.console import Console

        from mnist_jobs.report import build_table, make_report

        print(f"\nin process (best of {args.repeat}):")
        load_t, table_t = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            rep = make_report(root)
            t1 = time.perf_counter()
            Console(file=io.StringIO(), width=160).print(build_table(rep))
            load_t.append(t1 - t0)
            table_t.append(time.perf_counter() - t1)
        print(f"  make_report (scan + parse + group + sort)        {min(load_t):6.3f} s")
        print(f"  build_table + render                             {min(table_t):6.3f} s")
        print(
            f"  → {sum(rep.counts.values())} runs {rep.counts}, {len(rep.rows)} rows, "
            f"{len(rep.skipped)} skipped"
        )


if __name__ == "__main__":
    main()
