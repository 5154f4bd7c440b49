"""Checkpoints and resume: a run stopped for real (SIGTERM through the job's handlers, or SIGKILL after a
periodic checkpoint) and resumed gives exactly the history of an uninterrupted run; bad checkpoints are
never loaded; a killed writer never leaves half a checkpoint; concurrent sweeps never train a run twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from mnist_jobs import checkpoint as ckpt
from mnist_jobs import claims
from mnist_jobs.claims import claim_run, run_is_claimed
from mnist_jobs.config import TrainConfig
from mnist_jobs.device import DistInfo
from mnist_jobs.grid import sweep_run_id
from mnist_jobs.local import free_port
from mnist_jobs.sweepdir import read_manifest
from mnist_jobs.train import Interrupted, StopFlag, train

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {  # ~1-3 s each on one CPU thread; small checkpoint intervals, evaluations off the grid
    "logreg": TrainConfig(model="logreg", lr=0.05, momentum=0.9, batch_size=64, iters=4000, eval_every=700),
    "cnn": TrainConfig(model="cnn", lr=0.05, momentum=0.5, batch_size=32, iters=300, eval_every=70),
}


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
                f"from mnist_jobs.claims import run_is_claimed; from pathlib import Path; "
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


def test_a_claim_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    """Another process's claim refuses ours (and the probe sees it); kill -9 of the holder frees it."""
    code = (
        "import sys, time; from pathlib import Path; from mnist_jobs.claims import claim_run\n"
        f"with claim_run(Path({str(tmp_path)!r}), 'r') as held:\n"
        "    print(held, flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert run_is_claimed(tmp_path, "r")
        with claim_run(tmp_path, "r") as mine:
            assert not mine
    finally:
        holder.kill()
        holder.wait()
    assert not run_is_claimed(tmp_path, "r")
    with claim_run(tmp_path, "r") as mine:
        assert mine


@pytest.mark.skipif(not claims._ofd, reason="claims are flocks here (no F_OFD_* locks)")
def test_struct_flock_layout_matches_the_kernel(tmp_path):
    """FLOCK packs struct flock as the kernel reads it: 32 bytes, and F_OFD_GETLK reports another
    process's byte-range lock with the right type, start, length and pid."""
    import ctypes

    class Flock(ctypes.Structure):  # the C declaration, laid out by the C compiler's rules
        _fields_ = [
            ("l_type", ctypes.c_short),
            ("l_whence", ctypes.c_short),
            ("l_start", ctypes.c_int64),
            ("l_len", ctypes.c_int64),
            ("l_pid", ctypes.c_int32),
        ]

    assert claims.FLOCK.size == ctypes.sizeof(Flock) == 32
    assert [getattr(Flock, f).offset for f, _ in Flock._fields_] == [0, 2, 8, 16, 24]
    path = tmp_path / "f"
    path.write_bytes(b"x" * 16)
    code = (
        "import fcntl, sys, time\n"
        f"f = open({str(path)!r}, 'r+'); fcntl.lockf(f, fcntl.LOCK_EX, 5, 3)\n"
        "print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with open(path, "rb") as f:
            query = claims.FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            got = claims.FLOCK.unpack(fcntl.fcntl(f, fcntl.F_OFD_GETLK, query))
        assert got == (fcntl.F_WRLCK, os.SEEK_SET, 3, 5, holder.pid)
    finally:
        holder.kill()
        holder.wait()
    with open(path, "rb") as f:  # and nothing once it is gone
        got = claims.FLOCK.unpack(fcntl.fcntl(f, fcntl.F_OFD_GETLK, query))
    assert got[0] == fcntl.F_UNLCK


PROBER = """
import sys
from pathlib import Path
from mnist_jobs.claims import run_is_claimed
folder, stop = Path(sys.argv[1]), Path(sys.argv[2])
probes = seen = 0
print("probing", flush=True)
while not stop.exists():
    for _ in range(100):
        seen += run_is_claimed(folder, "r")
    probes += 100
print(probes, seen)
"""


def test_probing_a_claim_never_refuses_it(tmp_path):
    """The defect: `status` (run_is_claimed) took the very lock a worker needs, so claims made while
    something polled were refused (about 5 % in a stress loop) and those runs ended with no result.
    One thread claims and releases 3000 times while another thread and another process probe in a
    loop: every claim is granted. (Before: hundreds refused.)"""
    with claim_run(tmp_path, "r"):  # (the lock file exists from the start)
        pass
    stop_file = tmp_path / "stop"
    prober = subprocess.Popen(
        [sys.executable, "-c", PROBER, str(tmp_path), str(stop_file)], stdout=subprocess.PIPE, text=True
    )
    stop = threading.Event()
    probes = [0, 0]  # this process's probes, and those that saw the claim held

    def probe() -> None:
        while not stop.is_set():
            probes[1] += run_is_claimed(tmp_path, "r")
            probes[0] += 1

    thread = threading.Thread(target=probe)
    refused = 0
    try:
        assert prober.stdout.readline().strip() == "probing"
        thread.start()
        for i in range(3000):
            with claim_run(tmp_path, "r") as mine:
                refused += not mine
                if i % 10 == 0:
                    time.sleep(0.0001)  # (held a moment: the probes see it)
            time.sleep(0.00005)  # not held a moment: the probes poll a free run, as `status` does
    finally:
        stop.set()
        stop_file.touch()
        thread.join()
        other, other_seen = map(int, prober.communicate(timeout=60)[0].split())
    assert refused == 0, f"{refused} of 3000 claims refused ({probes[0]} + {other} probes)"
    assert probes[0] > 100 and other > 1000 and probes[1] + other_seen > 0, (probes, other, other_seen)


@pytest.mark.parametrize(
    "fstype, options, local",
    [
        ("nfs4", "rw,relatime,vers=4.2,rsize=1048576,hard,proto=tcp,sec=sys,local_lock=none", False),
        ("nfs", "rw,vers=3,nolock,proto=tcp", True),
        ("nfs", "rw,vers=3,local_lock=all", True),
        ("nfs4", "rw,vers=4.1,local_lock=posix", True),
        ("nfs4", "rw,vers=4.1,local_lock=flock", False),  # flock local, POSIX/OFD claims still global
        ("lustre", "rw,flock,lazystatfs", False),
        ("lustre", "rw,localflock,lazystatfs", True),
        ("lustre", "rw,lazystatfs", True),
        ("cifs", "rw,vers=3.0,nobrl", True),
        ("ext4", "rw,relatime,nolock", False),  # (only network filesystems)
    ],
)
def test_node_local_lock_mount_options(fstype, options, local):
    assert (claims.node_local_locks(fstype, options) is not None) == local


def test_mount_of_finds_the_deepest_mount_holding_a_folder():
    mountinfo = textwrap.dedent(
        """\
        22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
        40 22 0:50 / /shared rw,relatime shared:5 - nfs4 srv:/export rw,vers=4.2,local_lock=none
        41 40 0:51 / /shared/my\\040lab rw - nfs srv:/lab rw,vers=3,nolock,addr=10.0.0.1
        """
    )
    assert claims.mount_of("/shared/my lab/sweeps/a", mountinfo) == (
        "/shared/my lab",
        "nfs",
        "rw,rw,vers=3,nolock,addr=10.0.0.1",
    )
    assert claims.mount_of("/shared/mylab", mountinfo)[:2] == ("/shared", "nfs4")
    assert claims.mount_of("/home/x", mountinfo)[:2] == ("/", "ext4")


def test_claims_warn_once_and_go_on_where_locks_fail_or_are_node_local(tmp_path, monkeypatch, capsys):
    """A lock call that fails (ENOLCK, ...) does not crash the job: one warning line, and the run
    trains unclaimed. A mount whose locks only this node sees: one warning line too."""

    def no_locks(*args, **kwargs):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(claims, "_warned", set())
    monkeypatch.setattr(claims, "_checked", set())
    with monkeypatch.context() as m:
        m.setattr(claims.fcntl, "fcntl", no_locks)
        m.setattr(claims.fcntl, "flock", no_locks)
        for run_id in ("a", "b"):
            with claim_run(tmp_path, run_id) as mine:
                assert mine
        assert not run_is_claimed(tmp_path, "a")
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("Warning: claims unavailable on ") and "ENOLCK" in line
    assert line.endswith("two sweeps sharing this folder may train a run twice")

    monkeypatch.setattr(claims, "_warned", set())
    nfs = ("/shared", "nfs", "rw,vers=3,local_lock=all")
    monkeypatch.setattr(claims, "mount_of", lambda path, text: nfs)
    for run_id in ("a", "b"):
        with claim_run(tmp_path, run_id) as mine:
            assert mine and run_is_claimed(tmp_path, run_id)  # (a real lock, seen on this node)
    [line] = capsys.readouterr().err.splitlines()
    assert line == (
        "Warning: claims unavailable on nfs /shared (mounted local_lock=all: locks are local to this "
        "node): two sweeps sharing this folder may train a run twice"
    )


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


def test_ddp_ranks_share_one_claim(tmp_path, monkeypatch):
    """A 2-rank DDP job: rank 0 claims and the other rank trains what it admitted. With the run
    claimed elsewhere (here, by this test process) both ranks skip it and exit cleanly, nothing
    written; unclaimed, the job trains it. No decision file is left behind either way."""
    from typer.testing import CliRunner

    from mnist_jobs import sweepdir
    from mnist_jobs.cli import app

    args = ["train", "--tasks-per-node", "2", "--device", "cpu", "--iters", "50", "--eval-every", "25"]
    args += ["--results-dir", str(tmp_path)]
    run_id = sweep_run_id(TrainConfig(iters=50, eval_every=25, device="cpu"))
    folder = tmp_path / f"train-{run_id}"
    runner = CliRunner()
    with claim_run(folder, run_id) as mine:
        assert mine
        res = runner.invoke(app, args)  # the planner sees the claim: nothing is submitted
        assert "1 run(s) already running (in another process): skipped" in res.output, res.output
        assert "nothing to submit" in res.output and not (folder / "logs").exists()
        # the claim taken between planning and the job's start (a race): the job sees it
        with monkeypatch.context() as m:
            m.setattr(sweepdir, "run_is_claimed", lambda folder, run_id: False)
            res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert f"{run_id}: being trained by another process, not here" in res.output
        assert "1 task(s) completed, 0 failed" in res.output
        assert not (folder / f"{run_id}.json").exists()
        said = sorted((folder / "logs").glob("*_result.pkl"))
        assert len(said) == 2  # both ranks ran, and both say they left the run alone
        for pkl in said:
            import pickle

            assert pickle.loads(pkl.read_bytes())[1] == [
                {"run_id": run_id, "status": "running elsewhere", "test_accuracy": None}
            ]
    assert not list(folder.glob("*admit*"))
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert re.search(rf"{run_id}: completed  \d", res.output), res.output
    rec = json.loads((folder / f"{run_id}.json").read_text())
    assert rec["status"] == "completed" and rec["distributed"]["world_size"] == 2
    assert not list(folder.glob("*admit*")) and not run_is_claimed(folder, run_id)


def test_ddp_admission_is_what_rank_0_claimed(tmp_path, monkeypatch):
    """Rank 0's decision, as the other ranks read it: they train exactly the runs it claimed, say what
    it said of the others, and a rank that sees no decision in time fails with a sentence."""
    from mnist_jobs.job import RUNNING_ELSEWHERE, TrainTask

    cfg = TrainConfig(iters=20, eval_every=10, device="cpu").to_dict()
    task = TrainTask(configs=[cfg, cfg, cfg], run_ids=["a", "b", "c"], results_dir=str(tmp_path))
    monkeypatch.setattr(TrainTask, "_admission_path", lambda self: tmp_path / ".a.admit-7.0")
    monkeypatch.setenv("MNIST_JOBS_DIST_TIMEOUT_S", "0.3")
    rank = [DistInfo(rank=r, local_rank=r, world_size=3, local_world_size=3) for r in range(3)]
    with pytest.raises(RuntimeError, match="rank 1: no decision from rank 0"):
        task._admitted(rank[1])
    with claim_run(tmp_path, "b"), contextlib.ExitStack() as stack:
        todo, skipped = task._claim(stack)  # b is held by someone else
        assert todo == [0, 2] and [s["status"] for s in skipped] == [RUNNING_ELSEWHERE]
        task._admit(stack, rank[0], todo, skipped)
        for r in (1, 2):
            assert task._admitted(rank[r]) == (todo, skipped)
        assert run_is_claimed(tmp_path, "a") and run_is_claimed(tmp_path, "c")
    assert not list(tmp_path.glob(".a.admit-*"))  # removed once both ranks had read it
    assert not run_is_claimed(tmp_path, "a") and not run_is_claimed(tmp_path, "c")


POLLER = """
import sys, time
from pathlib import Path
from mnist_jobs.claims import run_is_claimed
from mnist_jobs.sweepdir import ManifestError, run_states
folder, ids, stop = Path(sys.argv[1]), sys.argv[2].split(","), Path(sys.argv[3])
probes = seen = 0
while not stop.exists():
    try:
        run_states(folder)  # what `status` does
    except ManifestError:
        pass  # (no manifest yet)
    for run_id in ids:
        seen += run_is_claimed(folder, run_id)
    probes += len(ids)
    time.sleep(0.002)
print(probes, seen)
"""


def test_two_sweeps_polled_all_along_train_every_run_exactly_once(tmp_path):
    """Acceptance: two `mnist-jobs sweep`s into one folder with overlapping grids (one of lone runs,
    one of packs of 3, so a pack trains the part of it that it claims), both starting with the shared
    runs, while one process probes every claim in a tight loop and `mnist-jobs status` runs over and
    over. Before, ~5 % of the claims made under such polling were refused, and those runs ended with
    no result. Now every run ends with exactly one completed result, trained by exactly one sweep."""
    shared = ["0.01", "0.02", "0.03", "0.04"]
    grids = [[*shared, "0.11"], [*shared, "0.21", "0.22", "0.23", "0.24", "0.25"]]
    packs = [[], ["--pack", "3"]]
    common = ["--iters", "20", "--eval-every", "10", "--device", "cpu", "--max-parallel", "1"]
    common += ["--name", "polled", "--results-dir", str(tmp_path)]
    folder = tmp_path / "polled"
    lrs = sorted({float(v) for g in grids for v in g})
    ids = {sweep_run_id(TrainConfig(lr=lr, iters=20, eval_every=10, device="cpu")) for lr in lrs}
    env = {**os.environ, "COLUMNS": "200"}
    stop = tmp_path / "stop"
    poller = subprocess.Popen(
        [sys.executable, "-c", POLLER, str(folder), ",".join(sorted(ids)), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    sweeps = [
        subprocess.Popen(
            [sys.executable, "-m", "mnist_jobs", "sweep", "--lr", ",".join(g), *pack, *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO,
        )
        for g, pack in zip(grids, packs)
    ]
    status_calls = 0
    try:
        while any(p.poll() is None for p in sweeps):  # `status` all along, as a user would
            cmd = [sys.executable, "-m", "mnist_jobs", "status", "polled", "--results-dir", str(tmp_path)]
            subprocess.run(cmd, capture_output=True, cwd=REPO, env=env, timeout=60)
            status_calls += 1
            time.sleep(0.5)
        outs = [p.communicate(timeout=300)[0] for p in sweeps]
    finally:
        stop.touch()
        for p in sweeps:
            if p.poll() is None:
                p.kill()
        probes, seen = map(int, poller.communicate(timeout=60)[0].split())
    assert [p.returncode for p in sweeps] == [0, 0], outs
    assert probes > 1000 and seen > 0 and status_calls > 3, (probes, seen, status_calls)
    results = sorted(p.stem for p in folder.glob("*.json") if p.name != "sweep.json")
    assert results == sorted(ids), outs  # one result per distinct run, nothing else
    for rid in ids:
        assert json.loads((folder / f"{rid}.json").read_text())["status"] == "completed"
        trained = sum(len(re.findall(rf"{rid}: completed  \d", out)) for out in outs)
        assert trained == 1, (rid, outs)  # trained by exactly one of the two processes
    status = subprocess.run(
        [sys.executable, "-m", "mnist_jobs", "status", "polled", "--results-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert status.stdout.count("COMPLETED") >= len(ids), status.stdout
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


def test_a_checkpoint_is_removed_once_every_run_in_it_completed_wherever_it_did(tmp_path, one_thread):
    """A pack checkpoint the planner cannot resume (its runs completed elsewhere, in other groupings)
    goes when the last of its runs completes; a lone one when its run does. One written after its
    run's result (a --force rerun's), or one with a run training now (claimed), stays."""
    from mnist_jobs.train import train_pack

    cfgs = [TrainConfig(lr=lr, iters=100, eval_every=50, device="cpu") for lr in (0.1, 0.2, 0.3)]
    a, b, c = "a", "b", "c"

    def stopped(configs, ids, at):
        stop = StopFlag()

        def progress(p):
            if p.iteration >= at:
                stop.request(signal.SIGTERM)

        with pytest.raises(Interrupted):
            train_pack(configs, run_ids=ids, results_dir=tmp_path, progress=progress, stop=stop,
                       checkpoint_every=0)  # fmt: skip

    stopped(cfgs, [a, b, c], 25)
    pack = ckpt.population_path(tmp_path, [a, b, c])
    stopped(cfgs[1:2], [b], 50)  # b alone, stopped too: its own checkpoint
    lone_b = ckpt.checkpoint_path(tmp_path, b)
    assert pack.exists() and lone_b.exists()

    train(cfgs[0], run_id=a, results_dir=tmp_path)  # a and c complete alone: b is not done
    train(cfgs[2], run_id=c, results_dir=tmp_path)
    assert pack.exists() and lone_b.exists()
    with claim_run(tmp_path, c):  # c trains again elsewhere (claimed) while b completes
        rec = train(cfgs[1], run_id=b, results_dir=tmp_path)
        assert rec["checkpointing"]["resumed_from_iteration"] == 50 and not lone_b.exists()
        assert pack.exists()  # every run of it is completed, but c is being trained
    assert ckpt.remove_finished(tmp_path) == [pack]  # every run of it completed, none training

    stopped(cfgs[:1], ["d"], 50)  # d stopped alone, then trained in a pack (from scratch) to the end
    train_pack(cfgs[:2], run_ids=["d", "e"], results_dir=tmp_path)
    assert not ckpt.checkpoint_path(tmp_path, "d").exists()  # its lone checkpoint went with it

    # a --force rerun's checkpoint is newer than the completed result it is about to replace: kept
    stopped(cfgs[:1], [a], 50)
    assert ckpt.remove_finished(tmp_path) == [] and ckpt.checkpoint_path(tmp_path, a).exists()
