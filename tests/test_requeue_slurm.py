"""Nothing lost, on the REAL one-node SLURM cluster (see test_slurm.py): a run that is requeued
(`scontrol requeue`), preempted / timed out (submitit's USR2) or killed (`kill -9`) resumes from its
checkpoint and ends with one completed result equal, bit for bit, to an uninterrupted run. A packed
sweep (--pack 3: one job, one process, one checkpoint file for its three runs) does the same when
requeued or killed.

The jobs run with one CPU thread (SLURM_CPUS_PER_TASK=1); the uninterrupted reference runs in this
process with one thread too, while the cluster holds the requeued job (~6-8 s, cred_expire=5).
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

from mnist_jobs.checkpoint import checkpoint_path, population_path
from mnist_jobs.cli import app
from mnist_jobs.config import TrainConfig
from mnist_jobs.grid import sweep_run_id
from mnist_jobs.report import make_report
from mnist_jobs.sweepdir import read_manifest, run_states
from mnist_jobs.train import train, train_pack

pytestmark = pytest.mark.slurm
runner = CliRunner()
CFG = TrainConfig(iters=20000, eval_every=5000, device="cpu")  # ~3-5 s of logreg on one thread
RUN_ID = sweep_run_id(CFG)
ARGS = ["--iters", "20000", "--eval-every", "5000", "--device", "cpu", "--checkpoint-every", "1000"]


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
    folder: Path, job_id: str, after: float = 0.0, timeout_s: float = 90, run_ids: tuple[str, ...] = (RUN_ID,)
) -> None:
    """Until the job runs and has written a periodic checkpoint (newer than `after`); `run_ids`: the
    runs the job trains (a pack's, in its order: their one checkpoint file)."""
    ck = population_path(folder, list(run_ids))
    deadline = time.monotonic() + timeout_s
    while not (squeue_state(job_id) == "RUNNING" and ck.exists() and ck.stat().st_mtime > after):
        assert time.monotonic() < deadline, (squeue_state(job_id), ck.exists())
        for run_id in run_ids:
            assert not (folder / f"{run_id}.json").exists(), "finished before it could be interrupted"
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
    # its failed result is history while the new job is queued or trains: report counts it live
    live = make_report(folder)
    assert live.counts["failed"] == 0 and sum(live.counts.values()) == 1, live.counts
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


# ---- a packed sweep (--pack): one process, one checkpoint file for all its runs ------------------

PACK_LRS = (0.01, 0.02, 0.05)
PACK_ITERS, PACK_EVAL = 30000, 7500  # a pack of 3 logreg models on one thread: ~6 s
PACK_CFGS = [TrainConfig(lr=lr, iters=PACK_ITERS, eval_every=PACK_EVAL, device="cpu") for lr in PACK_LRS]
PACK_IDS = [sweep_run_id(c) for c in PACK_CFGS]  # grid order = the pack's order
PACK_ARGS = [
    "--lr",
    ",".join(map(str, PACK_LRS)),
    "--pack",
    "3",
    "--iters",
    str(PACK_ITERS),
    "--eval-every",
    str(PACK_EVAL),
    "--device",
    "cpu",
    "--checkpoint-every",
    "1000",
]


@pytest.fixture(scope="module")
def pack_reference(tmp_path_factory):
    """The uninterrupted pack, in-process with one thread, computed once when first asked for."""
    cache: list[list[dict]] = []

    def get() -> list[dict]:
        if not cache:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                folder = tmp_path_factory.mktemp("pack-ref")
                cache.append(train_pack(PACK_CFGS, run_ids=PACK_IDS, results_dir=folder))
            finally:
                torch.set_num_threads(before)
        return cache[0]

    return get


def sweep_pack(results: Path, name: str, *extra: str):
    return runner.invoke(
        app,
        ["sweep", *PACK_ARGS, "--partition", "gpu", "--name", name, "--results-dir", str(results), *extra],
    )


def submit_pack(results: Path, name: str) -> tuple[Path, str]:
    """The pack's dry run, then its submission: the dry run showed exactly the task and the sbatch
    script that were submitted."""
    dry = sweep_pack(results, name, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "1 task(s) of at most 3 run(s) each" in dry.output
    tasks = [
        ln.split(":", 1)[1].strip().split(", ") for ln in dry.output.splitlines() if ln.startswith("  task ")
    ]
    assert tasks == [PACK_IDS]  # one task, its runs in grid order
    assert not (results / name).exists()  # a dry run writes nothing

    res = sweep_pack(results, name)
    assert res.exit_code == 0, res.output
    assert "submitted 3 run(s) as 1 task(s)" in res.output
    folder = results / name
    runs = read_manifest(folder)["runs"]
    assert list(runs) == PACK_IDS
    [job_id] = {info["job_id"] for info in runs.values()}  # one job trains all three
    for run_id, info in runs.items():
        assert info["packed_with"] == [r for r in PACK_IDS if r != run_id]
    # one task is one plain job (no array), and the script sbatch got is the one the dry run printed
    assert "_" not in job_id
    sbatch_lines = [ln for ln in dry.output.splitlines() if ln.startswith("#SBATCH")]
    assert not [ln for ln in sbatch_lines if ln.startswith("#SBATCH --array")]
    submitted = (folder / "logs" / f"{job_id}_submission.sh").read_text().splitlines()
    assert sbatch_lines == [ln for ln in submitted if ln.startswith("#SBATCH")]
    return folder, job_id


def wait_pack(folder: Path, states: tuple[str, ...], timeout_s: float = 120) -> list[dict]:
    """Until every run of the sweep is in one of `states`."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = run_states(folder)
        if all(r["state"] in states for r in rows):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.5)


def assert_pack_equals_reference(folder: Path, refs: list[dict], skip: tuple[str, ...] = ()) -> list[dict]:
    """Each run (but `skip`): one completed result, its history and final weights bit for bit the
    uninterrupted pack's, the pack's checkpoint gone."""
    recs = []
    for run_id, ref in zip(PACK_IDS, refs):
        if run_id in skip:
            continue
        [path] = [p for p in folder.glob("*.json") if p.name == f"{run_id}.json"]
        rec = json.loads(path.read_text())
        assert rec["status"] == "completed" and rec["run_id"] == run_id
        assert rec["metrics"]["history"] == ref["metrics"]["history"]  # every evaluation, bit for bit
        assert rec["metrics"]["test_accuracy"] == ref["metrics"]["test_accuracy"]
        assert (
            rec["metrics"]["iterations"] == PACK_ITERS
            and len(rec["metrics"]["history"]) == PACK_ITERS // PACK_EVAL
        )
        assert rec["packed_with"] == [r for r in PACK_IDS if r != run_id]
        assert rec["timings"]["pack_size"] == 3
        assert rec["model_path"] == str(folder / f"{run_id}.pt")
        weights = torch.load(folder / f"{run_id}.pt", weights_only=True)
        ref_weights = torch.load(ref["model_path"], weights_only=True)
        assert weights.keys() == ref_weights.keys()
        assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
        assert rec["checkpointing"]["path"] == str(population_path(folder, PACK_IDS))
        recs.append(rec)
    assert len({r["metrics"]["test_accuracy"] for r in recs}) == len(recs)  # different models
    assert not population_path(folder, PACK_IDS).exists()
    assert not list(folder.glob("*.ckpt.pt"))
    return recs


def test_packed_sweep_requeued_mid_run_resumes_every_run(cluster, results, pack_reference):
    folder, job_id = submit_pack(results, "pack-requeue")
    wait_running_with_checkpoint(folder, job_id, run_ids=tuple(PACK_IDS))
    saved = torch.load(population_path(folder, PACK_IDS), weights_only=True)
    assert saved["run_ids"] == PACK_IDS and saved["loop"]["iteration"] % 1000 == 0
    t0 = time.monotonic()
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    while squeue_state(job_id) == "RUNNING":  # the old attempt ends at once (SIGTERM, checkpoint)
        assert time.monotonic() - t0 < 30
        time.sleep(0.1)
    refs = pack_reference()  # while SLURM holds the requeued job
    rows = wait_pack(folder, ("COMPLETED", "FAILED"))
    assert [r["state"] for r in rows] == ["COMPLETED"] * 3, rows
    recs = assert_pack_equals_reference(folder, refs)
    stopped = {r["checkpointing"]["resumed_from_iteration"] for r in recs}
    assert len(stopped) == 1  # one checkpoint: the pack's runs stopped and resumed together
    [at] = stopped
    assert 0 < at < PACK_ITERS
    for rec in recs:
        ck = rec["checkpointing"]
        assert ck["requeues"] == 1 and ck["resumes"] == 1
        assert rec["slurm"]["restart_count"] == "1" and rec["slurm"]["job_id"] == job_id
    log = (folder / "logs" / f"{job_id}_0_log.out").read_text()
    assert f"stopping at iteration {at}: checkpoint written to {population_path(folder, PACK_IDS)}" in log
    assert f"resuming {', '.join(PACK_IDS)} from {population_path(folder, PACK_IDS)} at iteration {at}" in log
    assert sacct_history(job_id)[0] == "REQUEUED"
    print(f"pack requeued at iteration {at}, done {time.monotonic() - t0:.1f} s after the requeue")


def test_packed_sweep_killed_resumes_at_the_next_sweep(cluster, results, pack_reference):
    folder, job_id = submit_pack(results, "pack-kill9")
    wait_running_with_checkpoint(folder, job_id, run_ids=tuple(PACK_IDS))
    logs = str(folder / "logs")
    pids = subprocess.run(
        ["pgrep", "-f", f"submitit.core._submit {logs}"], capture_output=True, text=True
    ).stdout.split()
    workers = [
        p for p in pids if "python" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode()
    ]
    assert len(workers) == 1, pids  # one process trains the whole pack
    os.kill(int(workers[0]), signal.SIGKILL)
    rows = wait_pack(folder, ("FAILED", "COMPLETED"))
    assert [r["state"] for r in rows] == ["FAILED"] * 3, rows
    state = torch.load(population_path(folder, PACK_IDS), weights_only=True)
    saved = state["loop"]["iteration"]
    assert saved % 1000 == 0 and state["run_ids"] == PACK_IDS  # the last periodic checkpoint
    status = runner.invoke(app, ["status", "pack-kill9", "--results-dir", str(results)])
    assert (
        "3 run(s) stopped with a checkpoint: the same `mnist-jobs sweep` (or `train`) again" in status.output
    )

    # meanwhile its second run is completed elsewhere: swept alone into the folder (from scratch)
    done_elsewhere = PACK_IDS[1]
    alone = [*PACK_ARGS]
    alone[alone.index("--lr") + 1], alone[alone.index("--pack") + 1] = str(PACK_LRS[1]), "1"
    res = runner.invoke(
        app,
        ["sweep", *alone, "--partition", "gpu", "--name", "pack-kill9", "--results-dir", str(results), "--wait"],
    )  # fmt: skip
    assert res.exit_code == 0 and "resume from their checkpoints" not in res.output, res.output
    elsewhere = (folder / f"{done_elsewhere}.json").read_bytes()
    assert json.loads(elsewhere)["status"] == "completed"
    lone_job = read_manifest(folder)["runs"][done_elsewhere]["job_id"]

    # the sweep again, asking for no packing: the checkpointed pack is kept whole, carrying the run
    # done elsewhere (trained along, not written), and the other two resume
    again = sweep_pack(results, "pack-kill9", "--pack", "1")
    assert again.exit_code == 0 and "submitted 2 run(s) as 1 task(s)" in again.output, again.output
    assert "2 run(s) resume from their checkpoints; 1 pack(s) kept whole" in again.output
    assert "carrying 1 run(s) done or training elsewhere" in again.output
    runs = read_manifest(folder)["runs"]
    [new_job] = {info["job_id"] for r, info in runs.items() if r != done_elsewhere}
    assert new_job not in (job_id, lone_job) and runs[done_elsewhere]["job_id"] == lone_job
    refs = pack_reference()
    rows = wait_pack(folder, ("COMPLETED", "FAILED"))
    assert [r["state"] for r in rows] == ["COMPLETED"] * 3, rows
    assert (folder / f"{done_elsewhere}.json").read_bytes() == elsewhere
    for rec in assert_pack_equals_reference(folder, refs, skip=(done_elsewhere,)):
        ck = rec["checkpointing"]
        assert ck["resumed_from_iteration"] == saved and ck["resumes"] == 1 and ck["requeues"] == 0
    log = (folder / "logs" / f"{new_job}_0_log.out").read_text()
    assert (
        f"resuming {', '.join(PACK_IDS)} from {population_path(folder, PACK_IDS)} at iteration {saved}" in log
    )


def test_packed_sweep_preempted_by_usr2_is_requeued_by_submitit_and_resumes(cluster, results, pack_reference):
    """submitit's preemption / time-limit signal on a pack: the loop checkpoints the whole pack,
    TrainTask (the same Checkpointable as for a lone run) has submitit requeue it, and it resumes."""
    folder, job_id = submit_pack(results, "pack-usr2")
    wait_running_with_checkpoint(folder, job_id, run_ids=tuple(PACK_IDS))
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    refs = pack_reference()
    rows = wait_pack(folder, ("COMPLETED", "FAILED"))
    assert [r["state"] for r in rows] == ["COMPLETED"] * 3, rows
    recs = assert_pack_equals_reference(folder, refs)
    for rec in recs:
        ck = rec["checkpointing"]
        assert ck["requeues"] == 1 and ck["resumes"] == 1 and 0 < ck["resumed_from_iteration"] < PACK_ITERS
    log = (folder / "logs" / f"{job_id}_0_log.out").read_text()
    assert "this job is preempted" in log and "Calling checkpoint method" in log
    assert f"resuming {', '.join(PACK_IDS)}" in log
