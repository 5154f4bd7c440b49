"""Checkpoints and resume: a run stopped for real (SIGTERM through the job's handlers, or SIGKILL after a
periodic checkpoint) and resumed gives exactly the history of an uninterrupted run; bad checkpoints are
never loaded; a killed writer never leaves half a checkpoint; concurrent sweeps never train a run twice.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mnist_jobs import checkpoint as ckpt
from mnist_jobs.config import TrainConfig
from mnist_jobs.device import DistInfo, free_port
from mnist_jobs.launch import claim_run, read_manifest, run_is_claimed, sweep_run_id
from mnist_jobs.train import Interrupted, StopFlag, train

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {  # ~1-3 s each on one CPU thread; small checkpoint intervals, evaluations off the grid
    "logreg": TrainConfig(model="logreg", lr=0.05, momentum=0.9, batch_size=64, iters=4000, eval_every=700),
    "cnn": TrainConfig(model="cnn", lr=0.05, momentum=0.5, batch_size=32, iters=300, eval_every=70),
}


@pytest.fixture
def one_thread():
    """The straight run and the interrupted one must use the same number of threads: on the CPU, a
    different split of the work changes float sums in the last bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted reference runs (one thread), computed once per model."""
    cache: dict[str, dict] = {}

    def get(model: str) -> dict:
        if model not in cache:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                cfg = CONFIGS[model]
                cache[model] = train(cfg, results_dir=tmp_path_factory.mktemp("straight"), run_id="r")
            finally:
                torch.set_num_threads(before)
        return cache[model]

    return get


# Stopped by SIGTERM / killed by SIGKILL and resumed, through the real sweep command, for every
# combination (logreg / cnn x lone / pack x 1 / 2 ranks): tests/test_matrix.py.


def test_in_process_stop_flag_and_periodic_checkpoints(tmp_path, straight, one_thread):
    cfg = CONFIGS["cnn"]
    stop = StopFlag()

    def progress(p):
        if p.iteration >= 100:
            stop.request(signal.SIGUSR2)

    with pytest.raises(Interrupted) as err:
        train(cfg, results_dir=tmp_path, run_id="r", checkpoint_every=0, stop=stop, progress=progress)
    assert err.value.iteration == 100 and err.value.signum == signal.SIGUSR2
    assert err.value.record["status"] == "interrupted" and not (tmp_path / "r.json").exists()
    rec = train(cfg, results_dir=tmp_path, run_id="r", checkpoint_every=None)
    assert rec["metrics"]["history"] == straight("cnn")["metrics"]["history"]
    assert rec["checkpointing"]["every"] == 0  # the default rule: off below 2000 iterations
    assert ckpt.resolve_every(None, 1999) == 0 and ckpt.resolve_every(None, 3000) == 1000
    assert ckpt.resolve_every(None, 1_000_000) == 50_000 and ckpt.resolve_every(7, 10) == 7


def test_unusable_checkpoints_are_ignored_with_a_warning(tmp_path, straight, one_thread):
    cfg = CONFIGS["cnn"]
    ck = ckpt.checkpoint_path(tmp_path, "r")
    ck.write_bytes(b"not a checkpoint at all")
    with pytest.warns(UserWarning, match="ignoring unusable checkpoint"):
        rec = train(cfg, results_dir=tmp_path, run_id="r")
    assert rec["checkpointing"]["resumed_from_iteration"] is None
    assert rec["metrics"]["history"] == straight("cnn")["metrics"]["history"]

    # a real checkpoint of another config (same file name) is not loaded either
    other = TrainConfig(model="cnn", lr=0.5, batch_size=32, iters=30, eval_every=10)
    stop = StopFlag()
    with pytest.raises(Interrupted):
        train(other, results_dir=tmp_path, run_id="o", stop=stop, progress=lambda p: stop.request())
    os.replace(ckpt.checkpoint_path(tmp_path, "o"), ck)
    with pytest.warns(UserWarning, match="another config"):
        assert ckpt.load(ck, [cfg], ["r"]) is None
    # truncated: half of a real file
    ck.write_bytes(ck.read_bytes()[:2000])
    with pytest.warns(UserWarning, match="ignoring unusable checkpoint"):
        assert ckpt.load(ck, [other], ["o"]) is None


def test_killed_checkpoint_writer_never_leaves_a_partial_file(tmp_path):
    """SIGKILL a process that rewrites a big checkpoint in a loop; what is on disk always loads."""
    cfg = TrainConfig(iters=5000)
    path = tmp_path / "r.ckpt.pt"
    code = textwrap.dedent(f"""
        import torch
        from mnist_jobs import checkpoint as ckpt
        i = 1
        while True:
            ckpt.save(__import__("pathlib").Path({str(path)!r}), {{
                "run_ids": ["r"], "configs": [{cfg.to_dict()!r}], "loop": {{"iteration": i}},
                "population": {{"model": {{"w": torch.randn(500_000)}}}}, "per_rank": []}})
            i += 1
    """)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", code])
        try:
            deadline = time.monotonic() + 60
            while not path.exists():
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(0.3)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        state = ckpt.load(path, [cfg], ["r"])  # never partial: it loads, the whole model in it
        assert state is not None and state["population"]["model"]["w"].numel() == 500_000


def test_claims_are_exclusive_and_released(tmp_path):
    assert not run_is_claimed(tmp_path, "r")
    with claim_run(tmp_path, "r") as mine:
        assert mine and run_is_claimed(tmp_path, "r")
        held = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from mnist_jobs.launch import run_is_claimed; from pathlib import Path; "
                f"print(run_is_claimed(Path({str(tmp_path)!r}), 'r'))",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert held.stdout.strip() == "True"
        with claim_run(tmp_path, "r") as again:  # a second open file description: refused
            assert not again
    assert not run_is_claimed(tmp_path, "r")


def test_two_concurrent_sweeps_into_one_folder_train_each_run_once(tmp_path):
    """Two real `mnist-jobs sweep` processes (local executor), started at once, with overlapping grids
    into the same sweep folder, both starting with the shared run: exactly one result per distinct run,
    each trained by one process only, and the manifest lists all of them."""
    common = [
        "--iters",
        "200",
        "--eval-every",
        "100",
        "--device",
        "cpu",
        "--name",
        "shared",
        "--results-dir",
        str(tmp_path),
        "--max-parallel",
        "1",
    ]
    env = {**os.environ, "COLUMNS": "200"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mnist_jobs", "sweep", "--lr", lrs, *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO,
        )
        for lrs in ("0.02,0.01", "0.02,0.03")
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folder = tmp_path / "shared"
    ids = {
        sweep_run_id(TrainConfig(lr=lr, iters=200, eval_every=100, device="cpu")) for lr in (0.01, 0.02, 0.03)
    }
    results = sorted(p.stem for p in folder.glob("*.json") if p.name != "sweep.json")
    assert sorted(results) == sorted(ids)  # one result per distinct run, nothing else
    for rid in ids:
        rec = json.loads((folder / f"{rid}.json").read_text())
        assert rec["status"] == "completed"
        trained = sum(len(re.findall(rf"{rid}: completed  \d", out)) for out in outs)
        assert trained == 1, (rid, outs)  # trained by exactly one of the two processes
    manifest = read_manifest(folder)
    assert set(manifest["runs"]) == ids and len(manifest["submissions"]) == 2
    assert not list(folder.glob("*.ckpt.pt")) and not list(folder.glob(".*.tmp"))


DDP_CFG = TrainConfig(
    model="cnn", lr=0.05, momentum=0.5, batch_size=63, iters=45, eval_every=15, device="cpu"
)


def _ddp_rank(rank: int, port: int, results: str, stop_at: int | None) -> None:
    torch.set_num_threads(1)
    dist = DistInfo(rank=rank, local_rank=rank, world_size=2, local_world_size=2, master_port=port)
    stop = StopFlag()

    def progress(p) -> None:  # rank 0 only: its stop request must stop both ranks at the same step
        if stop_at is not None and p.iteration >= stop_at:
            stop.request(signal.SIGTERM)

    try:
        train(DDP_CFG, results_dir=results, run_id="d", dist=dist, stop=stop, progress=progress)
    except Interrupted:
        os._exit(3)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _ddp_run(results: Path, stop_at: int | None) -> list[int | None]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, str(results), stop_at)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    return [p.exitcode for p in procs]


def test_ddp_run_stopped_and_resumed_equals_uninterrupted(tmp_path):
    """Two gloo ranks; the stop request of rank 0 stops both at the same iteration (they agree every
    20 steps), each rank's RNG (dropout) and partial loss go into the checkpoint, and the resumed pair
    gives the uninterrupted pair's history exactly. (Odd batch size: the ranks' shards differ.)"""
    assert _ddp_run(tmp_path / "straight", None) == [0, 0]
    assert _ddp_run(tmp_path / "stopped", 15) == [3, 3]
    saved = torch.load(ckpt.checkpoint_path(tmp_path / "stopped", "d"), weights_only=True)
    assert saved["loop"]["iteration"] == 20 and len(saved["per_rank"]) == 2
    assert _ddp_run(tmp_path / "stopped", None) == [0, 0]
    a = json.loads((tmp_path / "straight" / "d.json").read_text())
    b = json.loads((tmp_path / "stopped" / "d.json").read_text())
    assert b["checkpointing"]["resumed_from_iteration"] == 20
    assert a["metrics"]["history"] == b["metrics"]["history"]


def test_force_restarts_a_stopped_pack_from_scratch(tmp_path):
    """`sweep --force` reruns from scratch: a pack's checkpoint (one file, named after its runs) is
    removed too, not resumed."""
    from mnist_jobs.train import train_pack

    args = ["--lr", "0.1,0.2", "--iters", "60", "--eval-every", "30", "--device", "cpu", "--pack", "2"]
    cfgs = [TrainConfig(lr=lr, iters=60, eval_every=30, device="cpu") for lr in (0.1, 0.2)]
    ids = [sweep_run_id(c) for c in cfgs]
    folder = tmp_path / "p"
    stop = StopFlag()
    with pytest.raises(Interrupted) as err:
        train_pack(cfgs, run_ids=ids, results_dir=folder, stop=stop, progress=lambda p: stop.request())
    assert [r["status"] for r in err.value.records] == ["interrupted", "interrupted"]
    assert ckpt.population_path(folder, ids).exists() and not list(folder.glob("*.json"))
    cmd = [sys.executable, "-m", "mnist_jobs", "sweep", *args, "--name", "p", "--results-dir", str(tmp_path)]
    subprocess.run([*cmd, "--force"], check=True, capture_output=True, cwd=REPO)
    for rid in ids:
        rec = json.loads((folder / f"{rid}.json").read_text())
        assert rec["status"] == "completed" and rec["checkpointing"]["resumed_from_iteration"] is None
    assert not list(folder.glob("*.ckpt.pt"))
