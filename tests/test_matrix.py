"""The combination matrix: {logreg, cnn} x {lone, pack of 3} x {1 rank, 2 gloo ranks} x {uninterrupted,
SIGTERM mid-run then `sweep` again, SIGKILL after a periodic checkpoint then `sweep` again}, each through
the real command a user types (`mnist-jobs sweep`, submitit's local executor, its worker processes
signalled as SLURM signals a job's tasks). Per combination, one sequence: the sweep is stopped by
SIGTERM, run again, killed by SIGKILL after its next periodic checkpoint, and run again to the end.
Every run must end with exactly one completed result whose history and weights equal the
uninterrupted run's, bit for bit (CPU, same thread count). A pack's last sweep asks for another --pack:
its checkpoint keeps it whole. The CNN cases train under onecycle on normalised images.

A pack under DDP is refused before anything starts (tested in test_sweep.py), so the 2-rank cases
are lone runs. The SLURM side (scontrol requeue of a packed sweep) is in test_requeue_slurm.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import terminal_job
from typer.testing import CliRunner

from mnist_jobs.checkpoint import SUFFIX
from mnist_jobs.cli import app
from mnist_jobs.config import TrainConfig
from mnist_jobs.grid import sweep_run_id
from mnist_jobs.sweepdir import read_manifest, run_states, scan
from mnist_jobs.train import train_pack

REPO = Path(__file__).resolve().parent.parent
LOGREG = {"model": "logreg", "momentum": 0.9, "batch_size": 64, "device": "cpu"}
# the CNN under a schedule on normalised images: stopped and resumed mid-schedule as well
CNN = {
    "model": "cnn",
    "momentum": 0.5,
    "batch_size": 32,
    "device": "cpu",
    "schedule": "onecycle",
    "normalize": True,
}
# name: (the grid, --checkpoint-every, --pack, --tasks-per-node). A few seconds of training each, the
# first periodic checkpoint early; few evaluations (the CNN's cost 0.4 s each here).
CASES = {
    "logreg-lone": ({**LOGREG, "lr": [0.05], "iters": 8000, "eval_every": 2000}, 500, 1, 1),
    "logreg-pack3": ({**LOGREG, "lr": [0.02, 0.05, 0.1], "iters": 6000, "eval_every": 2000}, 500, 3, 1),
    "logreg-ddp2": ({**LOGREG, "lr": [0.05], "iters": 800, "eval_every": 400}, 100, 1, 2),
    "cnn-lone": ({**CNN, "lr": [0.05], "iters": 200, "eval_every": 100}, 20, 1, 1),
    "cnn-pack3": ({**CNN, "lr": [0.02, 0.05, 0.1], "iters": 100, "eval_every": 50}, 10, 3, 1),
    "cnn-ddp2": ({**CNN, "lr": [0.05], "iters": 200, "eval_every": 100}, 20, 1, 2),
}


def configs(case: str) -> list[TrainConfig]:
    grid = dict(CASES[case][0])
    return [TrainConfig(**{**grid, "lr": lr}) for lr in grid.pop("lr")]


def sweep_cmd(case: str, results: Path, pack: int | None = None) -> list[str]:
    grid, every, case_pack, tasks = CASES[case]
    pack = case_pack if pack is None else pack
    opts = [a for k, v in grid.items() for a in (f"--{k.replace('_', '-')}", _option_text(v))]
    return [
        *(sys.executable, "-m", "mnist_jobs", "sweep", *opts, "--checkpoint-every", str(every)),
        *("--pack", str(pack), "--tasks-per-node", str(tasks), "--max-parallel", "1", "--name", "m"),
        *("--results-dir", str(results)),
    ]


def _option_text(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def run_sweep(case: str, results: Path, pack: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        sweep_cmd(case, results, pack),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )


def results_of(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in scan(folder)[0]}


def lone_job_threads() -> int:
    """The threads a local sweep's lone job trains on here, one at a time (local.run_local): the user's
    OMP_NUM_THREADS (the two test lanes set 1), else every core. Runs compared bit for bit use it."""
    from mnist_jobs.local import user_threads

    return user_threads() or os.cpu_count() or 1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted runs: in this process for one rank (with the threads the local executor gives
    a lone task: lone_job_threads), through the same sweep command for DDP."""
    cache: dict[str, dict[str, dict]] = {}

    def get(case: str) -> dict[str, dict]:
        if case not in cache:
            results = tmp_path_factory.mktemp(f"straight-{case}")
            if CASES[case][3] == 1:
                cfgs = configs(case)
                before = torch.get_num_threads()
                torch.set_num_threads(lone_job_threads())
                try:
                    recs = train_pack(cfgs, run_ids=[sweep_run_id(c) for c in cfgs], results_dir=results)
                finally:
                    torch.set_num_threads(before)
                cache[case] = {r["run_id"]: r for r in recs}
            else:
                done = run_sweep(case, results)
                assert done.returncode == 0, done.stdout + done.stderr
                cache[case] = results_of(results / "m")
            assert len(cache[case]) == len(configs(case))
            assert all(r["status"] == "completed" for r in cache[case].values())
        return cache[case]

    return get


def workers(folder: Path) -> list[int]:
    """The processes submitit started for the sweep's job (one per task: a DDP job has two)."""
    out = subprocess.run(
        ["pgrep", "-f", f"submitit.core._submit {folder / 'logs'}"], capture_output=True, text=True
    ).stdout.split()
    return [int(p) for p in out]


def interrupt(case: str, results: Path, how: str) -> int:
    """Start the sweep, wait for a periodic checkpoint newer than any on disk, signal every task of
    its job (`how`: sigterm, sigkill, or cancel: `mnist-jobs cancel`); return the iteration the
    checkpoint on disk then holds."""
    folder = results / "m"
    before = {p: p.stat().st_mtime_ns for p in folder.glob(f"*{SUFFIX}")}
    proc = subprocess.Popen(
        sweep_cmd(case, results),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=terminal_job,
    )

    def fresh() -> bool:
        for p in folder.glob(f"*{SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                if before.get(p) != p.stat().st_mtime_ns:
                    return True
        return False

    try:
        deadline = time.monotonic() + 120
        while not fresh():
            assert proc.poll() is None, f"ended before a new checkpoint:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        pids = workers(folder)
        assert len(pids) == CASES[case][3], pids
        if how == "cancel":  # what a user types in another terminal: SIGTERM through the job's controller
            said = CliRunner().invoke(app, ["cancel", "m", "--results-dir", str(results)])
            assert said.exit_code == 0 and "\nstopped 1 local job(s)" in said.output, said.output
            assert said.output.startswith(f"interrupted the sweep process(es) {proc.pid} here"), said.output
        elif how == "ctrl-c":  # the terminal's SIGINT, to the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        elif how == "hangup":  # the terminal closed (ssh lost): SIGHUP to the whole process group
            os.killpg(proc.pid, signal.SIGHUP)
        else:
            for pid in pids:
                os.kill(pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    if how in ("ctrl-c", "cancel"):  # the sweep says what became of its runs, and exits as interrupted
        assert proc.returncode == 130, out
        n = len(configs(case))
        assert f"interrupted\n{n} run(s) stopped with a checkpoint: the same" in out, out
    elif how == "hangup":  # the sweep process ends at once; its tasks checkpoint, then exit
        assert proc.returncode == -signal.SIGHUP, out
        deadline = time.monotonic() + 60
        while workers(folder):
            assert time.monotonic() < deadline, "the tasks did not stop"
            time.sleep(0.05)
    else:
        assert proc.returncode == 1, out  # the task failed: stopped (SIGTERM) or killed
    assert not results_of(folder), "a stopped or killed run wrote a result"
    [ck] = folder.glob(f"*{SUFFIX}")
    it = torch.load(ck, weights_only=True)["loop"]["iteration"]
    if how != "sigkill":  # stopped, not killed: it checkpointed where it stopped, and said so
        log = "".join(q.read_text() for q in (folder / "logs").glob("*_log.out"))
        assert f"stopping at iteration {it}: checkpoint written" in log, log[-2000:]
    return it


@pytest.mark.parametrize("case", list(CASES))
def test_stopped_killed_and_swept_again_equals_uninterrupted(tmp_path, case, uninterrupted):
    iters, every = CASES[case][0]["iters"], CASES[case][1]
    # SIGTERM: checkpoints at the next iteration (DDP: where the ranks next agree, every 20), stops
    termed_at = interrupt(case, tmp_path, "sigterm")
    assert 0 < termed_at < iters
    killed_at = interrupt(case, tmp_path, "sigkill")  # resumed, then killed: the last periodic one
    assert termed_at < killed_at < iters and killed_at % every == 0
    status = CliRunner().invoke(app, ["status", "m", "--results-dir", str(tmp_path)])
    n = len(configs(case))
    assert (
        f"{n} run(s) stopped with a checkpoint: the same `mnist-jobs sweep` (or `train`) again"
        in status.output
    )

    # a killed DDP job leaves rank 0's decision for its ranks (.<run>.admit-<job>.<attempt>): made an
    # hour and more old here, the next DDP job's rank 0 removes it
    stale = list((tmp_path / "m").glob(".*.admit-*"))
    assert bool(stale) == (CASES[case][3] > 1), stale
    for p in stale:
        os.utime(p, (time.time() - 7200, time.time() - 7200))

    # what a user does: the same command again; for a pack, with another --pack (its checkpoint
    # holds the 3 models stacked: the planner keeps the pack whole, and it resumes)
    packed = CASES[case][2] > 1
    again = run_sweep(case, tmp_path, pack=2 if packed else None)
    assert again.returncode == 0, again.stdout + again.stderr
    if packed:
        assert "3 run(s) resume from their checkpoints; 1 pack(s) kept whole" in again.stdout
    folder = tmp_path / "m"
    got, ref = results_of(folder), uninterrupted(case)
    assert sorted(got) == sorted(ref)  # exactly one result per run
    for run_id, rec in got.items():
        assert rec["status"] == "completed"
        assert rec["metrics"]["history"] == ref[run_id]["metrics"]["history"]  # bit for bit
        ck = rec["checkpointing"]
        assert ck["resumed_from_iteration"] == killed_at and ck["resumes"] == 2
        assert rec["packed_with"] == ref[run_id]["packed_with"]
        a = torch.load(rec["model_path"], weights_only=True)
        b = torch.load(ref[run_id]["model_path"], weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(folder.glob(f"*{SUFFIX}"))  # the checkpoint is gone once the results are written
    assert not list(folder.glob(".*.admit-*"))  # and so is every DDP decision, the killed job's too
    log = "".join(p.read_text() for p in (folder / "logs").glob("*_log.out"))
    assert f"stopping at iteration {termed_at}" in log and f"at iteration {killed_at}" in log
    manifest = read_manifest(folder)
    assert set(manifest["runs"]) == set(got) and len(manifest["submissions"]) == 3


@pytest.mark.parametrize("where", ["planner", "job"])
def test_a_killed_pack_resumes_whole_carrying_a_run_completed_elsewhere(tmp_path, where, uninterrupted):
    """A pack killed after a checkpoint, then one of its runs completed elsewhere (a sweep of it alone
    into the same folder: it trains from scratch). The pack's checkpoint only loads into the same
    pack, so the other two resume in it, carrying the completed run: trained along, never written.
    The planner carries it (`sweep` again), or the job finds it completed when it claims (a task
    planned before, run now). Either way the two equal the uninterrupted runs bit for bit, and the
    completed run's result, weights and manifest entry are untouched."""
    case = "logreg-pack3"
    killed_at = interrupt(case, tmp_path, "sigkill")
    folder = tmp_path / "m"
    a, b, c = (sweep_run_id(cfg) for cfg in configs(case))
    grid = CASES[case][0]
    lone = [*sweep_cmd(case, tmp_path, pack=1)]
    lone[lone.index("--lr") + 1] = str(grid["lr"][1])  # b alone: not the pack, so from scratch
    done = subprocess.run(lone, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resume from their checkpoints" not in done.stdout
    b_result = (folder / f"{b}.json").read_bytes()
    b_weights = (folder / f"{b}.pt").read_bytes()
    assert json.loads(b_result)["checkpointing"]["resumed_from_iteration"] is None
    b_logs = {f: f.read_bytes() for f in (folder / "tb" / b).rglob("*") if f.is_file()}
    assert b_logs  # (TensorBoard logs: on in the tests)
    assert len(list(folder.glob(f"pack-*{SUFFIX}"))) == 1  # the pack's, still needed by a and c

    if where == "planner":
        dry = subprocess.run(
            [*sweep_cmd(case, tmp_path), "--dry-run"], capture_output=True, text=True, cwd=REPO
        )
        assert dry.returncode == 0, dry.stdout + dry.stderr  # what the sweep again would do: the same
        assert "1 run(s) already completed: skipped" in dry.stdout, dry.stdout
        assert f"  task 0: {a}, {b} (carried), {c}\n" in dry.stdout, dry.stdout
        again = run_sweep(case, tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "2 run(s) resume from their checkpoints; 1 pack(s) kept whole" in again.stdout
        assert "carrying 1 run(s) done or training elsewhere" in again.stdout
    else:
        from mnist_jobs.job import COMPLETED_ELSEWHERE, TrainTask

        task = TrainTask(
            configs=[cfg.to_dict() for cfg in configs(case)],
            run_ids=[a, b, c],
            results_dir=str(folder),
            threads=lone_job_threads(),
            checkpoint_every=CASES[case][1],
        )
        said = {o["run_id"]: o["status"] for o in task()}
        assert said == {a: "completed", b: COMPLETED_ELSEWHERE, c: "completed"}

    got, ref = results_of(folder), uninterrupted(case)
    assert sorted(got) == sorted(ref)
    for run_id in (a, c):
        rec = got[run_id]
        assert rec["status"] == "completed"
        assert rec["metrics"]["history"] == ref[run_id]["metrics"]["history"]  # bit for bit
        assert rec["checkpointing"]["resumed_from_iteration"] == killed_at
        assert rec["packed_with"] == ref[run_id]["packed_with"]  # the whole pack, b too
        w, w_ref = (torch.load(r["model_path"], weights_only=True) for r in (rec, ref[run_id]))
        assert all(torch.equal(w[k], w_ref[k]) for k in w_ref)
    assert (folder / f"{b}.json").read_bytes() == b_result  # carried: never written
    assert (folder / f"{b}.pt").read_bytes() == b_weights
    assert {f: f.read_bytes() for f in (folder / "tb" / b).rglob("*") if f.is_file()} == b_logs
    assert not list(folder.glob(f"*{SUFFIX}"))
    if where == "planner":
        assert read_manifest(folder)["runs"][b]["packed_with"] == []  # still its own lone sweep's


def test_a_run_the_planner_carried_but_free_when_the_job_starts_is_trained_and_written(
    tmp_path, uninterrupted
):
    """The planner carried a run of a checkpointed pack (it was training elsewhere, or queued), but by
    the time the job starts it has no result and no one holds it: the job claims it and writes it like
    the others, all three resumed from the pack's checkpoint, bit for bit the uninterrupted pack."""
    from mnist_jobs.job import TrainTask

    case = "logreg-pack3"
    killed_at = interrupt(case, tmp_path, "sigkill")
    run_ids = [sweep_run_id(cfg) for cfg in configs(case)]
    task = TrainTask(
        configs=[cfg.to_dict() for cfg in configs(case)],
        run_ids=run_ids,
        results_dir=str(tmp_path / "m"),
        threads=lone_job_threads(),
        carried=[run_ids[1]],
    )
    assert {o["run_id"]: o["status"] for o in task()} == dict.fromkeys(run_ids, "completed")
    got, ref = results_of(tmp_path / "m"), uninterrupted(case)
    assert sorted(got) == sorted(ref)
    for run_id, rec in got.items():
        assert rec["checkpointing"]["resumed_from_iteration"] == killed_at
        assert rec["metrics"]["history"] == ref[run_id]["metrics"]["history"]


@pytest.mark.parametrize(
    ("how", "case"),
    [
        ("cancel", "logreg-lone"),  # (DDP: the controller hands SIGTERM to each task as to one)
        ("ctrl-c", "logreg-pack3"),
        ("ctrl-c", "logreg-ddp2"),
        ("hangup", "logreg-lone"),
    ],
)
def test_a_local_sweep_stopped_by_its_user_checkpoints_and_the_sweep_again_resumes(
    tmp_path, how, case, uninterrupted
):
    """A user stops a sweep running on this machine: `mnist-jobs cancel` in another terminal (SIGTERM
    to the local job's controller, which hands it to every task), Ctrl-C in its own
    (SIGINT to the process group: the tasks take it, submitit's controller ignores it rather than
    kill them mid-checkpoint), or closing that terminal (SIGHUP to the group). Every run checkpoints
    and stops, writes no result (not a failed one), and the same sweep again resumes it, bit for bit
    the uninterrupted run."""
    stopped_at = interrupt(case, tmp_path, how)
    assert 0 < stopped_at < CASES[case][0]["iters"]
    n = len(configs(case))
    status = CliRunner().invoke(app, ["status", "m", "--results-dir", str(tmp_path)])
    assert f"{n} run(s) stopped with a checkpoint" in status.output, status.output
    again = CliRunner().invoke(app, ["cancel", "m", "--results-dir", str(tmp_path)])
    assert again.output.strip() == "nothing to cancel in m", again.output
    done = run_sweep(case, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    got, ref = results_of(tmp_path / "m"), uninterrupted(case)
    assert sorted(got) == sorted(ref)
    for run_id, rec in got.items():
        assert rec["checkpointing"]["resumed_from_iteration"] == stopped_at
        assert rec["metrics"]["history"] == ref[run_id]["metrics"]["history"]


def two_runs_one_at_a_time(tmp_path: Path) -> tuple[list[str], Path]:
    """A local sweep of two lone runs, one at a time (the second waits for a slot): its command and
    folder."""
    grid = ["--lr", "0.05,0.1", "--iters", "8000", "--eval-every", "2000", "--momentum", "0.9"]
    cmd = [sys.executable, "-m", "mnist_jobs", "sweep", *grid, "--device", "cpu", "--checkpoint-every", "500",
           "--max-parallel", "1", "--name", "two", "--results-dir", str(tmp_path)]  # fmt: skip
    return cmd, tmp_path / "two"


def wait_for_a_checkpoint(proc: subprocess.Popen, folder: Path) -> None:
    """Until the sweep `proc` has written a checkpoint in `folder` (it must not end first)."""
    deadline = time.monotonic() + 120
    while not list(folder.glob(f"*{SUFFIX}")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.01)


def test_cancel_of_a_local_sweep_also_stops_the_runs_still_waiting_for_a_slot(tmp_path):
    """Two lone runs, one at a time: `cancel` while the first trains stops it (it checkpoints) and
    interrupts the sweep process, so the second never starts; the sweep again resumes the first and
    trains the second from scratch."""
    cmd, folder = two_runs_one_at_a_time(tmp_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True, preexec_fn=terminal_job)  # fmt: skip
    try:
        wait_for_a_checkpoint(proc, folder)
        said = CliRunner().invoke(app, ["cancel", "two", "--results-dir", str(tmp_path)])
        assert "interrupted the sweep process(es)" in said.output and "stopped 1 local job(s)" in said.output
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted\n1 run(s) stopped with a checkpoint" in out, out
    assert len(list((folder / "logs").glob("*_submitted.pkl"))) == 1  # the second was never started
    [ck] = folder.glob(f"*{SUFFIX}")
    stopped = ck.name.removesuffix(SUFFIX)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    recs = results_of(folder)
    assert len(recs) == 2 and all(r["status"] == "completed" for r in recs.values())
    assert recs[stopped]["checkpointing"]["resumed_from_iteration"] is not None
    [other] = set(recs) - {stopped}
    assert recs[other]["checkpointing"]["resumed_from_iteration"] is None


def test_status_and_cancel_find_the_job_that_trains_a_run_when_a_second_sweep_recorded_it(tmp_path):
    """A second sweep of the same run that planned it before the first's job claimed it (a race: its
    planner is blinded here) records its own job for the run; that job finds the claim and ends. The
    run's claim names the job that trains it: `status` shows that job RUNNING, and `cancel` stops
    it (it checkpoints), not the job the manifest recorded last."""
    from mnist_jobs.claims import claim_holder

    grid = ["--lr", "0.05", "--iters", "40000", "--eval-every", "20000", "--device", "cpu"]
    args = ["sweep", *grid, "--checkpoint-every", "500", "--name", "race", "--results-dir", str(tmp_path)]
    folder, run_id = (
        tmp_path / "race",
        sweep_run_id(TrainConfig(lr=0.05, iters=40000, eval_every=20000, device="cpu")),
    )
    first = subprocess.Popen([sys.executable, "-m", "mnist_jobs", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True, preexec_fn=terminal_job)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (holder := claim_holder(folder, run_id) or {}).get("job_id"):  # (its note is written)
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
            time.sleep(0.01)
        trainer = holder["job_id"]
        assert holder["executor"] == "local" and holder["pid"] in workers(folder), holder
        blind = (
            "from mnist_jobs import cli, sweepdir; sweepdir.run_is_claimed = lambda f, r: False; cli.app()"
        )
        second = subprocess.run([sys.executable, "-c", blind, *args], capture_output=True, text=True,
                                cwd=REPO, timeout=120, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
        assert "being trained by another process, not here" in second.stdout, second.stdout + second.stderr
        recorded = read_manifest(folder)["runs"][run_id]["job_id"]
        assert recorded != trainer  # the manifest names the second sweep's job, which ended
        status = CliRunner().invoke(app, ["status", "race", "--results-dir", str(tmp_path)],
                                    env={"COLUMNS": "200"})  # fmt: skip
        assert re.search(rf"{run_id}[\s│]+{trainer}[\s│]+RUNNING", status.output), status.output
        said = CliRunner().invoke(app, ["cancel", "race", "--results-dir", str(tmp_path)])
        assert f"stopped 1 local job(s): {trainer} " in said.output, said.output
        out = first.communicate(timeout=120)[0]
    finally:
        first.kill()
    assert first.returncode == 130 and "1 run(s) stopped with a checkpoint" in out, out
    assert not results_of(folder) and list(folder.glob(f"*{SUFFIX}"))


def test_sigterm_to_a_local_sweep_process_is_a_ctrl_c(tmp_path):
    """`kill <sweep pid>` (or `timeout`) signals the sweep process alone, not its jobs: it stops them as
    Ctrl-C does (each checkpoints), starts none of the runs waiting for a slot, and exits as
    interrupted; meanwhile `status` shows the waiting run PENDING (its sweep still runs), not MISSING."""
    cmd, folder = two_runs_one_at_a_time(tmp_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True, preexec_fn=terminal_job)  # fmt: skip
    try:
        wait_for_a_checkpoint(proc, folder)
        states = sorted(str(r["state"]) for r in run_states(folder))
        assert states == ["PENDING", "RUNNING"], states
        os.kill(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted\n1 run(s) stopped with a checkpoint" in out, out
    assert not workers(folder) and not results_of(folder)
    assert len(list((folder / "logs").glob("*_submitted.pkl"))) == 1  # the second was never started
    assert sorted(str(r["state"]) for r in run_states(folder)) == ["MISSING", "MISSING"]


def test_a_job_stopped_on_its_own_is_reported_stopped_and_the_sweep_goes_on(tmp_path):
    """A stray SIGTERM to one local job (its controller, as `cancel` sends it) stops that run with a
    checkpoint; the sweep says so, not `failed`, trains the run still waiting, and exits 1."""
    cmd, folder = two_runs_one_at_a_time(tmp_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True, preexec_fn=terminal_job, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    try:
        wait_for_a_checkpoint(proc, folder)
        [ck] = folder.glob(f"*{SUFFIX}")
        stopped = ck.name.removesuffix(SUFFIX)
        os.kill(int(read_manifest(folder)["runs"][stopped]["job_id"]), signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 1, out
    assert (
        f"{stopped}: stopped with a checkpoint" in out
        and "0 failed; 1 run(s) stopped with a checkpoint" in out
    )
    [(other, rec)] = results_of(folder).items()
    assert other != stopped and rec["status"] == "completed"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c-ignored", "nohup"])
def test_a_sweep_ignoring_a_stop_signal_trains_on_through_it(tmp_path, signum):
    """A signal the sweep was started with ignored stops nothing, neither the sweep nor its jobs (they
    keep it ignored), and the sweep completes: SIGHUP under nohup (the terminal closing), SIGINT for a
    sweep a script started with `&` (a Ctrl-C to the terminal's process group)."""
    cmd = sweep_cmd("logreg-lone", tmp_path)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True,
        preexec_fn=lambda: (terminal_job(), signal.signal(signum, signal.SIG_IGN)),
    )  # fmt: skip
    try:
        wait_for_a_checkpoint(proc, tmp_path / "m")
        os.killpg(proc.pid, signum)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    [rec] = results_of(tmp_path / "m").values()
    assert rec["status"] == "completed" and rec["checkpointing"]["resumed_from_iteration"] is None
