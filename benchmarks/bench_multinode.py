"""Multi-node DDP on the test cluster: samples/s of the same run on 1 node (1 rank), 1 node (2 ranks)
and 2 nodes (1 rank each), side by side in one run, through `mnist-jobs train --partition gpu --wait`.

    bash slurm/cluster.sh start --nodes 3
    python benchmarks/bench_multinode.py                 # logreg and CNN, 600 iterations, batch 100
    python benchmarks/bench_multinode.py --models logreg --iters 2000

The test cluster's nodes are namespaces of one machine: every rank shares the same CPU cores (one
thread per rank), so 2 nodes measure the cost of DDP over a (virtual) network, not a speedup.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {
    "1 node x 1 rank": ["--nodes", "1", "--tasks-per-node", "1"],
    "1 node x 2 ranks": ["--nodes", "1", "--tasks-per-node", "2"],
    "2 nodes x 1 rank": ["--nodes", "2", "--tasks-per-node", "1"],
}


def one(model: str, iters: int, layout: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "mnist_jobs", "train", "--model", model, "--iters", str(iters)]
    cmd += ["--eval-every", str(iters), "--lr", "0.01", "--momentum", "0.9", "--device", "cpu"]
    cmd += ["--partition", "gpu", "--cpus-per-task", "1"]
    cmd += [*layout, "--results-dir", str(out), "--wait"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    [path] = [p for p in out.glob("*/*.json") if p.name != "sweep.json"]
    return json.loads(path.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="logreg,cnn")
    p.add_argument("--iters", type=int, default=600)
    args = p.parse_args()
    print(f"{'model':8} {'layout':18} {'samples/s':>10} {'vs 1 rank':>9} {'acc %':>7}  hosts")
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        for model in args.models.split(","):
            base = None
            for label, layout in LAYOUTS.items():
                rec = one(model, args.iters, layout, Path(tmp) / f"{model}-{label.replace(' ', '')}")
                sps = rec["timings"]["samples_per_s"]
                base = base or sps
                hosts = ",".join(rec["distributed"]["hosts"])
                acc = rec["metrics"]["test_accuracy"]
                print(f"{model:8} {label:18} {sps:10.0f} {sps / base:8.2f}x {acc:7.2f}  {hosts}", flush=True)


if __name__ == "__main__":
    main()
