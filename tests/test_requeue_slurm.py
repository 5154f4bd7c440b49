"""Nothing lost, on the REAL one-node SLURM cluster (see test_slurm.py): a run that is requeued
(`scontrol requeue`), preempted / timed out (submitit's USR2) or killed (`kill -9`) resumes from its
checkpoint and ends with one completed result equal, bit for bit, to an uninterrupted run.

The jobs run with one CPU thread (SLURM_CPUS_PER_TASK=1); the uninterrupted reference runs in this
process with one thread too, while the cluster holds the requeued job (~11-13 s, cred_expire=10).
The time-limit test's job (--time-min 1) is submitted by the first test, so that its minute or so
overlaps the others.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mnist_jobs.checkpoint import checkpoint_path
from mnist_jobs.cli import app
from mnist_jobs.config import TrainConfig
from mnist_jobs.launch import read_manifest, run_states, sweep_run_id
from mnist_jobs.train import train

pytestmark = pytest.mark.slurm
runner = CliRunner()
CFG = TrainConfig(iters=40000, eval_every=5000, device="cpu")  # ~5-10 s of logreg on one thread
RUN_ID = sweep_run_id(CFG)
ARGS = ["--iters", "40000", "--eval-every", "5000", "--device", "cpu", "--checkpoint-every", "1000"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, computed once, when first asked for (during a requeue hold)."""
    cache: list[dict] = []

    def get() -> dict:
        if not cache:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                cache.append(train(CFG, results_dir=tmp_path_factory.mktemp("ref"), run_id="ref"))
            finally:
                torch.set_num_threads(before)
        return cache[0]

    return get


def submit(results: Path, name: str, *extra: str, args: list[str] = ARGS) -> tuple[Path, str]:
    res = runner.invoke(
        app, ["sweep", *args, "--partition", "gpu", "--name", name, "--results-dir", str(results), *extra]
    )
    assert res.exit_code == 0, res.output
    folder = results / name
    [info] = read_manifest(folder)["runs"].values()
    return folder, info["job_id"]


LONG = ["--iters", "100000000", "--eval-every", "10000000", "--device", "cpu", "--checkpoint-every", "1000"]


@pytest.fixture(scope="module")
def time_limit_job(cluster, tmp_path_factory) -> tuple[Path, str]:
    """A run far longer than its 1-minute limit: SLURM sends USR2 15 s before the limit (up to 30 s
    earlier: slurmctld checks every 30 s); it may be requeued once (--max-requeues 1)."""
    results = tmp_path_factory.mktemp("time-limit")
    return submit(results, "timelimit", "--time-min", "1", "--max-requeues", "1", args=LONG)


def squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def wait_running_with_checkpoint(
    folder: Path, job_id: str, after: float = 0.0, timeout_s: float = 90
) -> None:
    """Until the job runs and has written a periodic checkpoint (newer than `after`)."""
    ck = checkpoint_path(folder, RUN_ID)
    deadline = time.monotonic() + timeout_s
    while not (squeue_state(job_id) == "RUNNING" and ck.exists() and ck.stat().st_mtime > after):
        assert time.monotonic() < deadline, (squeue_state(job_id), ck.exists())
        assert not (folder / f"{RUN_ID}.json").exists(), "finished before it could be interrupted"
        time.sleep(0.1)


def wait_state(folder: Path, states: tuple[str, ...], timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        [row] = run_states(folder)
        if row["state"] in states:
            return row
        assert time.monotonic() < deadline, row
        time.sleep(0.5)


def sacct_history(job_id: str) -> list[str]:
    """Every attempt of a job (-D: requeued ones too), oldest first."""
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-D", "-o", "State", "-j", job_id], capture_output=True, text=True
    )
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def result(folder: Path) -> dict:
    return json.loads((folder / f"{RUN_ID}.json").read_text())


def assert_equals_reference(rec: dict, ref: dict) -> None:
    assert rec["status"] == "completed"
    assert rec["metrics"]["history"] == ref["metrics"]["history"]  # every evaluation, bit for bit
    assert rec["metrics"]["test_accuracy"] == ref["metrics"]["test_accuracy"]
    assert rec["metrics"]["iterations"] == CFG.iters


def test_scontrol_requeue_resumes_from_the_checkpoint(cluster, results, reference, time_limit_job):
    folder, job_id = submit(results, "requeue")
    wait_running_with_checkpoint(folder, job_id)
    t0 = time.monotonic()
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    while squeue_state(job_id) == "RUNNING":  # the old attempt ends at once (SIGTERM, checkpoint)
        assert time.monotonic() - t0 < 30
        time.sleep(0.1)
    ref = reference()  # while SLURM holds the requeued job
    while squeue_state(job_id) != "RUNNING":
        assert time.monotonic() - t0 < 90, squeue_state(job_id)
        time.sleep(0.1)
    restart_s = time.monotonic() - t0
    row = wait_state(folder, ("COMPLETED", "FAILED"))
    assert row["state"] == "COMPLETED", row
    rec = result(folder)
    assert_equals_reference(rec, ref)
    ck = rec["checkpointing"]
    # SLURM sent SIGTERM: the loop checkpointed where it was, the requeued job started from there
    assert ck["requeues"] == 1 and ck["resumes"] == 1 and 0 < ck["resumed_from_iteration"] < CFG.iters
    assert rec["slurm"]["restart_count"] == "1" and rec["slurm"]["job_id"] == job_id
    log = (folder / "logs" / f"{job_id}_0_log.out").read_text()
    assert f"stopping at iteration {ck['resumed_from_iteration']}" in log
    assert f"resuming {RUN_ID}" in log
    assert not checkpoint_path(folder, RUN_ID).exists()
    assert sacct_history(job_id)[0] == "REQUEUED"
    print(f"requeued job {job_id} running again after {restart_s:.1f} s")


def test_kill_9_fails_then_sweep_again_resumes(cluster, results, reference):
    folder, job_id = submit(results, "kill9")
    wait_running_with_checkpoint(folder, job_id)
    logs = str(folder / "logs")
    pids = subprocess.run(
        ["pgrep", "-f", f"submitit.core._submit {logs}"], capture_output=True, text=True
    ).stdout.split()
    workers = [
        p for p in pids if "python" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode()
    ]
    assert len(workers) == 1, pids
    os.kill(int(workers[0]), signal.SIGKILL)
    row = wait_state(folder, ("FAILED", "COMPLETED"))
    assert row["state"] == "FAILED" and row["test_accuracy"] is None  # sacct FAILED, no result
    status = runner.invoke(app, ["status", "kill9", "--results-dir", str(results)])
    assert "FAILED" in status.output
    saved = torch.load(checkpoint_path(folder, RUN_ID), weights_only=True)["loop"]["iteration"]
    assert saved % 1000 == 0  # the last periodic checkpoint (SIGKILL gives no chance for another)

    again = runner.invoke(
        app, ["sweep", *ARGS, "--partition", "gpu", "--name", "kill9", "--results-dir", str(results)]
    )
    assert again.exit_code == 0 and "submitted 1 run(s)" in again.output, again.output
    new_job = read_manifest(folder)["runs"][RUN_ID]["job_id"]
    assert new_job != job_id
    row = wait_state(folder, ("COMPLETED", "FAILED"))
    assert row["state"] == "COMPLETED", row
    rec = result(folder)
    assert_equals_reference(rec, reference())
    ck = rec["checkpointing"]
    assert ck["resumed_from_iteration"] == saved and ck["resumes"] == 1 and ck["requeues"] == 0


def test_usr2_preemption_requeues_at_most_max_requeues_times(cluster, results, reference):
    """submitit's preemption / time-limit signal (USR2, what `--signal=USR2@60` sends before the time
    limit): checkpoint, submitit requeues the job, it resumes. With --max-requeues 1 the second one
    ends the job failed, the checkpoint kept; `sweep --retry-failed` finishes it."""
    folder, job_id = submit(results, "usr2", "--max-requeues", "1")
    wait_running_with_checkpoint(folder, job_id)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    t_signal = time.time()
    ref = reference()
    wait_running_with_checkpoint(folder, job_id, after=t_signal + 1)  # requeued, resumed, checkpointing
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    row = wait_state(folder, ("FAILED", "COMPLETED"))
    assert row["state"] == "FAILED", row
    rec = result(folder)
    assert rec["status"] == "failed" and rec["error"]["type"] == "RequeueLimit"
    assert "--max-requeues 1" in rec["error"]["message"] and "--retry-failed" in rec["error"]["message"]
    assert rec["checkpointing"]["requeues"] == 1 and rec["checkpointing"]["resumes"] == 1
    log = (folder / "logs" / f"{job_id}_0_log.out").read_text()
    assert "this job is preempted" in log and "Calling checkpoint method" in log
    assert "Job not requeued because: checkpoint function returned None" in log
    stopped = torch.load(checkpoint_path(folder, RUN_ID), weights_only=True)["loop"]["iteration"]

    again = runner.invoke(
        app,
        [
            "sweep",
            *ARGS,
            "--partition",
            "gpu",
            "--name",
            "usr2",
            "--results-dir",
            str(results),
            "--retry-failed",
        ],
    )
    assert again.exit_code == 0 and "submitted 1 run(s)" in again.output, again.output
    assert wait_state(folder, ("COMPLETED", "FAILED"))["state"] == "COMPLETED"
    rec = result(folder)
    assert_equals_reference(rec, ref)
    assert rec["checkpointing"]["resumed_from_iteration"] == stopped and rec["checkpointing"]["resumes"] == 2


def test_time_limit_requeues_then_stops_at_max_requeues(cluster, time_limit_job):
    """The real time-limit path: SLURM's USR2 before the limit -> checkpoint -> submitit sees a timeout
    and requeues -> the run resumes -> the next limit finds no requeue left: one failed record saying
    so, the checkpoint kept (`--retry-failed` would resume it: see the USR2 test)."""
    folder, job_id = time_limit_job
    deadline = time.monotonic() + 240
    while squeue_state(job_id):
        assert time.monotonic() < deadline, squeue_state(job_id)
        time.sleep(1)
    wait_state(folder, ("FAILED",), 60)
    rec = json.loads(next(p for p in folder.glob("logreg-*.json")).read_text())
    assert rec["status"] == "failed" and rec["error"]["type"] == "RequeueLimit"
    ck = rec["checkpointing"]
    assert ck["requeues"] == 1 and ck["resumes"] == 1 and ck["resumed_from_iteration"] > 0
    assert checkpoint_path(folder, rec["run_id"]).exists()
    log = (folder / "logs" / f"{job_id}_0_log.out").read_text()
    assert log.count("this job is timed-out") == 2 and "Requeued job" in log
    assert "Job not requeued because: timed-out too many times" in log
    assert sacct_history(job_id) == ["REQUEUED", "FAILED"]
