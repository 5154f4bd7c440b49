"""Integration tests on a REAL one-node SLURM cluster (slurm/cluster.sh: munged, MariaDB, slurmdbd,
slurmctld, slurmd, two fake GPUs). Started once per session, stopped at the end, pass or fail.

Outside CI the tests skip when the cluster cannot be started (not root, no apt); in CI (CI=true) they
fail instead, so they can never silently not run there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import wait_done
from typer.testing import CliRunner

from mnist_jobs.claims import run_is_claimed
from mnist_jobs.cli import app
from mnist_jobs.slurm import max_array_size
from mnist_jobs.sweepdir import read_manifest, run_states

pytestmark = pytest.mark.slurm
runner = CliRunner()
FAST = ["--iters", "60", "--eval-every", "30", "--device", "cpu"]


def sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", "State", "-j", job_id], capture_output=True, text=True
    )
    return out.stdout.split()[0] if out.stdout.split() else ""


def wait_sacct(job_id: str, prefix: str, timeout_s: float = 60) -> None:
    """The result file lands a moment before SLURM marks the job finished."""
    deadline = time.monotonic() + timeout_s
    while not sacct_state(job_id).startswith(prefix):
        assert time.monotonic() < deadline, f"{job_id}: {sacct_state(job_id)}"
        time.sleep(0.5)


def test_sweep_on_slurm_end_to_end(cluster, results):
    args = [
        "sweep",
        "--lr",
        "0.001,0.01",
        "--partition",
        "gpu",
        *FAST,
        "--name",
        "lr",
        "--results-dir",
        str(results),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    manifest = read_manifest(results / "lr")
    job_ids = [r["job_id"] for r in manifest["runs"].values()]
    assert len({j.split("_")[0] for j in job_ids}) == 1  # one array
    assert sorted(j.split("_")[1] for j in job_ids) == ["0", "1"]
    rows = wait_done(results / "lr")
    assert [r["state"] for r in rows] == ["COMPLETED", "COMPLETED"]
    for run_id, info in manifest["runs"].items():
        rec = json.loads((results / "lr" / f"{run_id}.json").read_text())
        assert rec["status"] == "completed" and rec["sweep"] == "lr"
        array_job, index = info["job_id"].split("_")
        assert rec["slurm"]["array_job_id"] == array_job and rec["slurm"]["array_task_id"] == index
        assert rec["slurm"]["partition"] == "gpu"
        wait_sacct(info["job_id"], "COMPLETED")
    status = runner.invoke(app, ["status", "lr", "--results-dir", str(results)])
    assert status.exit_code == 0 and status.output.count("COMPLETED") == 2
    logs = runner.invoke(app, ["logs", "lr", "--results-dir", str(results)])
    assert logs.exit_code == 0 and "test_acc" in logs.output

    again = runner.invoke(app, args)  # resume: nothing left to submit
    assert again.exit_code == 0 and "2 run(s) already completed: skipped" in again.output
    assert "nothing to submit" in again.output
    assert len(read_manifest(results / "lr")["submissions"]) == 1

    local = runner.invoke(
        app, ["sweep", "--lr", "0.001,0.01", *FAST, "--name", "lr", "--results-dir", str(results / "local")]
    )
    assert local.exit_code == 0 and "executor local" in local.output
    assert read_manifest(results / "local" / "lr")["executor"] == "local"


def test_wait_exits_1_when_a_run_it_submitted_did_not_complete(cluster, results):
    """`sweep --wait` ends as a local sweep does: exit 1 when a run it submitted failed (here its job's
    --setup fails before training), so `sweep --wait && report` stops; its empty logs say so."""
    args = ["sweep", "--lr", "0.01", *FAST, "--partition", "gpu", "--setup", "exit 3", "--name", "wf",
            "--results-dir", str(results)]  # fmt: skip
    res = runner.invoke(app, [*args, "--wait"])
    assert res.exit_code == 1 and "1 run(s) submitted did not complete" in res.output, res.output
    assert [r["state"] for r in run_states(results / "wf")] == ["FAILED"]
    # a cluster without accounting (no sacct): the job is gone from the queue, with no result: FAILED
    # too, not MISSING (squeue alone answers)
    bare = results / "bin"
    bare.mkdir()
    (bare / "squeue").symlink_to(shutil.which("squeue"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", str(bare))
        assert shutil.which("sacct") is None
        assert [(r["state"], r["history"]) for r in run_states(results / "wf")] == [("FAILED", "")]
    said = runner.invoke(app, ["logs", "wf", "--results-dir", str(results)])
    assert said.exit_code == 0 and "are empty" in said.output, said.output


def test_cancel_a_long_job(cluster, results):
    res = runner.invoke(
        app,
        [
            "train",
            "--iters",
            "1000000",
            "--device",
            "cpu",
            "--partition",
            "gpu",
            "--results-dir",
            str(results),
        ],
    )
    assert res.exit_code == 0, res.output
    [folder] = [p.parent for p in results.glob("*/sweep.json")]
    deadline = time.monotonic() + 120
    while run_states(folder)[0]["state"] != "RUNNING":
        assert time.monotonic() < deadline, run_states(folder)
        time.sleep(0.5)
    job_id = run_states(folder)[0]["job_id"]
    while not run_is_claimed(folder, run_states(folder)[0]["run_id"]):  # its task has started
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # how far it has got, from its job's note on the shared filesystem
    while not (note := run_states(folder)[0]["progress"]):
        assert time.monotonic() < deadline, run_states(folder)
        time.sleep(0.2)
    assert note["iters"] == 1000000 and 0 <= note["iteration"] < 1000000, note
    # the same command again (train on SLURM always reruns, as --force): the run is training, so
    # nothing is submitted, and the job that trains it stays the one status and cancel know
    again = runner.invoke(app, ["train", "--iters", "1000000", "--device", "cpu", "--partition", "gpu",
                                "--results-dir", str(results)])  # fmt: skip
    assert "1 run(s) already running (in another process): skipped" in again.output, again.output
    assert "nothing to submit" in again.output and len(read_manifest(folder)["submissions"]) == 1
    assert run_states(folder)[0]["job_id"] == job_id
    out = runner.invoke(app, ["cancel", folder.name, "--results-dir", str(results)])
    assert out.exit_code == 0 and f"cancelled 1 job(s): {job_id}" in out.output
    wait_sacct(run_states(folder)[0]["job_id"], "CANCELLED")
    assert wait_done(folder, 60)[0]["state"] in ("CANCELLED", "FAILED")
    out = runner.invoke(app, ["cancel", folder.name, "--results-dir", str(results)])
    assert "nothing to cancel" in out.output


def test_two_identical_sweeps_submitted_at_once_submit_each_run_once(cluster, results):
    """Two `sweep`s of the same grid started together (a script run twice): one submits, and the other,
    planning once the first has recorded its jobs, finds them queued and submits nothing, --force or
    not. (Held with begin=now+1hour: nothing trains.)"""
    import os
    import sys

    cmd = [sys.executable, "-m", "mnist_jobs", "sweep", *FAST, "--lr", "0.01,0.02", "--partition", "gpu",
           "--slurm-opt", "begin=now+1hour", "--name", "twice", "--results-dir", str(results)]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for c in (cmd, [*cmd, "--force"])]  # fmt: skip
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folder = results / "twice"
    try:
        manifest = read_manifest(folder)
        assert len(manifest["submissions"]) == 1, outs
        assert sum("submitted 2 run(s)" in o for o in outs) == 1, outs
        assert sum("2 run(s) already queued: skipped" in o for o in outs) == 1, outs
        [job] = {i["job_id"].split("_")[0] for i in manifest["runs"].values()}
        queued = subprocess.run(["squeue", "-h", "-o", "%i", "-j", job], capture_output=True, text=True)
        assert len(queued.stdout.split()) >= 1 and {r["state"] for r in run_states(folder)} == {"PENDING"}
    finally:
        out = runner.invoke(app, ["cancel", "twice", "--results-dir", str(results)])
    assert "cancelled 2 job(s)" in out.output, out.output


def test_a_folder_with_slurm_and_local_runs_treats_each_run_by_its_own_executor(cluster, results):
    """A SLURM sweep, then a local sweep into the same folder (debugging on the login node): each run's
    manifest entry says where it went. The local sweep does not train the run still queued on SLURM,
    status asks SLURM about that run alone (PENDING, not MISSING), and cancel scancels it alone."""
    common = ["sweep", *FAST, "--name", "mixed", "--results-dir", str(results)]
    queued = runner.invoke(
        app, [*common, "--lr", "0.01", "--partition", "gpu", "--slurm-opt", "begin=now+1hour"]
    )
    assert queued.exit_code == 0, queued.output
    folder = results / "mixed"
    [(slurm_run, info)] = read_manifest(folder)["runs"].items()
    assert info["executor"] == "slurm" and "host" not in info
    here = runner.invoke(app, [*common, "--lr", "0.01,0.02"])  # no SLURM option: on this machine
    assert here.exit_code == 0, here.output
    assert "1 run(s) already queued: skipped" in here.output and "running 1 run(s) here" in here.output
    runs = read_manifest(folder)["runs"]
    [local_run] = set(runs) - {slurm_run}
    assert runs[local_run]["executor"] == "local" and runs[local_run]["host"]
    assert runs[slurm_run]["job_id"] == info["job_id"]  # untouched by the local sweep
    states = {r["run_id"]: str(r["state"]) for r in run_states(folder)}
    assert states == {slurm_run: "PENDING", local_run: "COMPLETED"}, states
    listed = runner.invoke(app, ["status", "--results-dir", str(results)], env={"COLUMNS": "200"})
    assert "local+slurm" in listed.output, listed.output  # the sweeps list: its executors
    out = runner.invoke(app, ["cancel", "mixed", "--results-dir", str(results)])
    assert out.exit_code == 0 and out.output.strip() == f"cancelled 1 job(s): {info['job_id']}", out.output
    wait_sacct(info["job_id"], "CANCELLED")
    assert not (folder / f"{slurm_run}.json").exists()


def test_max_parallel_bounds_the_runs_of_every_array_at_once(cluster, results):
    """A grid larger than MaxArraySize is split into several arrays; with --max-parallel 2 they are
    chained (the second waits for the first: afterany), so never more than 2 of its tasks run at once;
    the dry run says so. Every run completes."""
    limit = max_array_size()
    assert limit and limit < 10, "the test cluster sets a small MaxArraySize"
    n = limit + 2
    args = ["sweep", "--seed", ",".join(map(str, range(n))), "--iters", "10", "--eval-every", "10",
            "--device", "cpu", "--partition", "gpu", "--max-parallel", "2", "--name", "capped",
            "--results-dir", str(results)]  # fmt: skip
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert "2 arrays, chained: each starts when the one before it has ended, so at most 2" in dry.output
    assert f"#SBATCH --array=0-{limit - 1}%2" in dry.output
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    folder = results / "capped"
    first, second = sorted(
        {r["job_id"].split("_")[0] for r in read_manifest(folder)["runs"].values()}, key=int
    )
    shown = subprocess.run(["scontrol", "show", "job", second], capture_output=True, text=True).stdout
    assert f"Dependency=afterany:{first}" in shown, shown
    most, deadline = 0, time.monotonic() + 300
    while not all(r["state"].done for r in run_states(folder)):
        running = subprocess.run(["squeue", "-h", "-t", "R", "-n", "capped", "-o", "%i"],
                                 capture_output=True, text=True).stdout.split()  # fmt: skip
        most = max(most, len(running))
        assert most <= 2 and time.monotonic() < deadline, running
        time.sleep(0.2)
    rows = run_states(folder)
    assert len(rows) == n and all(r["state"] == "COMPLETED" for r in rows) and most >= 1


def test_ddp_job_runs_as_two_slurm_tasks(cluster, results):
    res = runner.invoke(
        app, ["train", *FAST, "--tasks-per-node", "2", "--partition", "gpu", "--results-dir", str(results)]
    )
    assert res.exit_code == 0, res.output
    [folder] = [p.parent for p in results.glob("*/sweep.json")]
    assert wait_done(folder)[0]["state"] == "COMPLETED"
    [result] = [p for p in folder.glob("logreg-*.json")]
    rec = json.loads(result.read_text())
    assert rec["distributed"]["world_size"] == 2 and rec["distributed"]["backend"] == "gloo"
    assert rec["slurm"]["ntasks"] == "2"


def test_gpu_gres_jobs_see_their_gpus(cluster, results):
    res = runner.invoke(
        app,
        [
            "sweep",
            "--seed",
            "0,1",
            *FAST,
            "--partition",
            "gpu",
            "--gpus-per-node",
            "1",
            "--name",
            "gres",
            "--results-dir",
            str(results),
        ],
    )
    assert res.exit_code == 0, res.output
    wait_done(results / "gres")
    seen = [
        json.loads(p.read_text())["env"]["cuda_visible_devices"]
        for p in (results / "gres").glob("logreg-*.json")
    ]
    assert all(s is not None for s in seen) and len(seen) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a login node without a GPU")
def test_cuda_pack_submits_from_a_gpu_less_login_node_and_is_sized_on_the_node(cluster, results):
    """README's packed GPU sweep typed on a login node without a GPU: it submits (the pack is sized where
    it trains). The test cluster's GPUs are fake, so on the node `--device cuda` fails each run of the
    pack with its own record, the node's error."""
    args = ["sweep", "--lr", "0.01,0.1", "--pack", "2", "--partition", "gpu", "--gpus-per-node", "1"]
    args += ["--device", "cuda", "--iters", "10", "--name", "cudapack", "--results-dir", str(results)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    assert "submitted 2 run(s) as 1 task(s)" in res.output
    rows = wait_done(results / "cudapack")
    assert [r["state"] for r in rows] == ["FAILED", "FAILED"]
    for p in (results / "cudapack").glob("logreg-*.json"):
        rec = json.loads(p.read_text())
        assert rec["status"] == "failed" and rec["error"]["type"] == "DeviceError"
        assert "CUDA is not available" in rec["error"]["message"] and len(rec["packed_with"]) == 1


def test_readme_toml_sweep_file_submits_to_slurm(cluster, results, tmp_path):
    """README's example sweep file, verbatim: its [slurm] table makes it a SLURM sweep (it used to train
    on the login node); the jobs really are on partition gpu with a 30-minute limit. Cancelled once seen
    there: what they train is the end-to-end test's business."""
    import re

    text = re.search(r"```toml\n(.*?)```", (Path(__file__).parent.parent / "README.md").read_text(), re.S)
    path = tmp_path / "lr-study.toml"
    path.write_text(text.group(1))
    res = runner.invoke(app, ["sweep", "--config", str(path), "--results-dir", str(results)])
    assert res.exit_code == 0, res.output
    assert "executor slurm" in res.output and "submitted 9 run(s)" in res.output
    manifest = read_manifest(results / "lr-study")
    assert manifest["executor"] == "slurm" and manifest["slurm"]["partition"] == "gpu"
    jobs = sorted({r["job_id"].split("_")[0] for r in manifest["runs"].values()})
    # what slurmctld holds for each job (pending, running or just finished alike)
    out = "".join(
        subprocess.run(["scontrol", "show", "job", j], capture_output=True, text=True).stdout for j in jobs
    )
    rows = set(zip(re.findall(r"\bPartition=(\S+)", out), re.findall(r"\bTimeLimit=(\S+)", out)))
    assert rows == {("gpu", "00:30:00")}, out
    cancelled = runner.invoke(app, ["cancel", "lr-study", "--results-dir", str(results)])
    assert cancelled.exit_code == 0, cancelled.output


def _error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("Error:")]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        # caught by the preflight (sinfo), before sbatch
        (["--partition", "nosuchpartition"], "partition 'nosuchpartition' does not exist"),
        (["--gpus-per-node", "3"], "--gpus-per-node 3 does not fit: nodes of partition gpu have at most 2"),
        (["--mem-gb", "100000"], "--mem-gb 100000 does not fit"),
        (["--cpus-per-task", "9"], "= 9 CPUs does not fit"),
        # refused by sbatch itself: its own message
        (
            ["--constraint", "nosuchfeature"],
            "sbatch refused the submission: sbatch: error: Batch job submission failed: Invalid feature",
        ),
        # an option sbatch does not know: its own first line, not its `Try "sbatch --help"`
        (["--slurm-opt", "bogus-opt=1"], "sbatch refused the submission: sbatch: unrecognized option"),
    ],
)
def test_sbatch_refusal_is_one_line_and_nothing_recorded(cluster, results, extra, needle):
    res = runner.invoke(
        app,
        [
            "sweep",
            "--lr",
            "0.1",
            "--partition",
            "gpu",
            *FAST,
            *extra,
            "--name",
            "bad",
            "--results-dir",
            str(results),
        ],
    )
    assert res.exit_code == 2
    assert len(_error_lines(res.output)) == 1 and needle in _error_lines(res.output)[0], res.output
    said = [ln for ln in res.output.splitlines() if not ln.startswith(("sweep bad:", "Warning: results dir"))]
    assert said == _error_lines(res.output), res.output  # nothing of sbatch's own around it
    assert "Traceback" not in res.output
    assert read_manifest(results / "bad") is None
    assert not [p for p in results.rglob("*") if p.is_file()]  # nothing written, nothing submitted
