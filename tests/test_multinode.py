"""Multi-node DDP on the REAL multi-node test cluster (slurm/cluster.sh start --nodes 3: three slurmd,
each in its own network + UTS namespace on a private bridge, so each has its own hostname and address,
all sharing this filesystem as a cluster shares NFS). Rendezvous comes from submitit's environment
(the first node's hostname), gloo talks over the bridge.

- a `--nodes 2` run trains with world size 2 on two hosts, rank 0 writes one result that names every
  rank's host, equal to the 1-process run (as tight as the 1-node DDP test, tests/test_ddp.py);
- `--nodes 2 --tasks-per-node 2` sweeps (world size 4) likewise;
- a 2-node run requeued mid-run (`scontrol requeue`) resumes on both nodes: its history equals the
  uninterrupted 2-node run's, bit for bit;
- a node that dies mid-run (link cut, every process on it killed, as in a power loss): the surviving
  rank gives up after the collective timeout (not later), SLURM marks the node DOWN (SlurmdTimeout=10, MessageTimeout=5)
  and requeues the job onto the two nodes left, and the run ends with exactly one completed result
  resumed from its last checkpoint, equal to the uninterrupted run; `status` shows the node failure;
- `--nodes` beyond the partition, or per-node resources no node has, is refused before submission.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import CLUSTER, CLUSTER_NODES, wait_done
from typer.testing import CliRunner

from mnist_jobs.checkpoint import checkpoint_path
from mnist_jobs.cli import app
from mnist_jobs.config import TrainConfig
from mnist_jobs.grid import sweep_run_id
from mnist_jobs.sweepdir import read_manifest
from mnist_jobs.train import train

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(CLUSTER_NODES < 3, reason="the multi-node tests need MNIST_JOBS_TEST_NODES >= 3"),
]
runner = CliRunner()

# ~8 s on two 1-thread ranks over the bridge (2 shared cores, ~4 ms a step); checkpoints every 250
# iterations, the first ~1 s in
CFG = TrainConfig(iters=2000, eval_every=500, lr=0.05, momentum=0.9, seed=3, device="cpu")
RUN_ID = sweep_run_id(CFG)
ARGS = ["--iters", "2000", "--eval-every", "500", "--lr", "0.05", "--momentum", "0.9", "--seed", "3"]
ARGS += ["--device", "cpu", "--checkpoint-every", "250"]
TWO_NODES = ["--partition", "gpu", "--nodes", "2", "--tasks-per-node", "1"]


def submit(results: Path, name: str, *extra: str, args: list[str] = ARGS) -> tuple[Path, list[str]]:
    res = runner.invoke(app, ["sweep", *args, *extra, "--name", name, "--results-dir", str(results)])
    assert res.exit_code == 0, res.output
    folder = results / name
    return folder, [info["job_id"] for info in read_manifest(folder)["runs"].values()]


def squeue(job_id: str, fmt: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", fmt], capture_output=True, text=True)
    return out.stdout.strip()


def wait_running_with_checkpoint(folder: Path, job_id: str, timeout_s: float = 120) -> None:
    ck = checkpoint_path(folder, RUN_ID)
    deadline = time.monotonic() + timeout_s
    while not (squeue(job_id, "%T") == "RUNNING" and ck.exists()):
        assert time.monotonic() < deadline, (squeue(job_id, "%T"), ck.exists())
        assert not (folder / f"{RUN_ID}.json").exists(), "finished before it could be interrupted"
        time.sleep(0.1)


def sacct_attempts(job_id: str) -> list[tuple[str, str]]:
    """(state, node list) of every attempt of a job, oldest first (-D: requeued ones too)."""
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-D", "-o", "State,NodeList", "-j", job_id],
        capture_output=True,
        text=True,
    )
    return [tuple(line.split("|")) for line in out.stdout.splitlines() if "|" in line]


def final_attempts(job_id: str, timeout_s: float = 60) -> list[tuple[str, str]]:
    """sacct's attempts once the last one has ended (the result lands a moment before SLURM marks the
    job finished)."""
    deadline = time.monotonic() + timeout_s
    while (attempts := sacct_attempts(job_id))[-1:] and attempts[-1][0] in (
        "RUNNING",
        "COMPLETING",
        "PENDING",
    ):
        assert time.monotonic() < deadline, attempts
        time.sleep(0.5)
    return attempts


def expand(nodelist: str) -> list[str]:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    return out.stdout.split()


def record(folder: Path, run_id: str = RUN_ID) -> dict:
    return json.loads((folder / f"{run_id}.json").read_text())


def assert_two_hosts(rec: dict) -> None:
    d = rec["distributed"]
    assert d["world_size"] == 2 and d["nodes"] == 2 and d["backend"] == "gloo", d
    assert len(set(d["hosts"])) == 2, d  # one rank per node, each on its own host
    assert d["hosts"] == expand(rec["slurm"]["nodelist"]), (d, rec["slurm"])  # in SLURM's order
    assert socket.gethostname() not in d["hosts"]  # not this (login) machine: the nodes' own names


def one_process(cfg: TrainConfig, tmp: Path) -> tuple[dict, dict]:
    """The run in this process, one thread (as the 1-node DDP test compares): record and weights."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = train(cfg, results_dir=tmp, run_id="one")
    finally:
        torch.set_num_threads(before)
    return rec, torch.load(tmp / "one.pt")


def assert_matches_one_process(rec: dict, weights_path: Path, one: tuple[dict, dict]) -> None:
    ref, w_one = one
    assert rec["status"] == "completed"
    assert abs(rec["metrics"]["test_accuracy"] - ref["metrics"]["test_accuracy"]) <= 0.1
    w = torch.load(weights_path)
    for k in w_one:
        torch.testing.assert_close(w[k], w_one[k], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> dict:
    """The 2-node run of CFG, uninterrupted (submitted through `train`, as a user would)."""
    results = tmp_path_factory.mktemp("mn-ref")
    res = runner.invoke(app, ["train", *ARGS, *TWO_NODES, "--results-dir", str(results)])
    assert res.exit_code == 0, res.output
    [folder] = [p.parent for p in results.glob("*/sweep.json")]
    [row] = wait_done(folder)
    assert row["state"] == "COMPLETED", row
    return {"record": record(folder), "weights": folder / f"{RUN_ID}.pt"}


def test_two_node_train_equals_one_process_and_names_every_host(uninterrupted, tmp_path):
    rec = uninterrupted["record"]
    assert_two_hosts(rec)
    assert rec["slurm"]["num_nodes"] == "2" and rec["slurm"]["ntasks"] == "2"
    assert_matches_one_process(rec, uninterrupted["weights"], one_process(CFG, tmp_path))
    assert len(list(uninterrupted["weights"].parent.glob("*.json"))) == 2  # one result (+ sweep.json)


def test_two_node_sweep_with_two_tasks_per_node(cluster, results, tmp_path):
    """World size 4: two ranks on each of two nodes, a sweep of two runs (two 2-node jobs)."""
    args = ["--iters", "300", "--eval-every", "150", "--lr", "0.05,0.1", "--seed", "1", "--device", "cpu"]
    folder, jobs = submit(
        results, "mn4", "--partition", "gpu", "--nodes", "2", "--tasks-per-node", "2", args=args
    )
    assert len(jobs) == 2
    rows = wait_done(folder)
    assert all(r["state"] == "COMPLETED" for r in rows), rows
    for row in rows:
        rec = record(folder, row["run_id"])
        d = rec["distributed"]
        assert d["world_size"] == 4 and d["nodes"] == 2 and d["tasks_per_node"] == 2, d
        a, b = expand(rec["slurm"]["nodelist"])
        assert d["hosts"] == [a, a, b, b] and a != b, d  # ranks 0,1 on the first node, 2,3 on the second
        cfg = TrainConfig.from_dict(rec["config"])
        assert_matches_one_process(
            rec, folder / f"{row['run_id']}.pt", one_process(cfg, tmp_path / row["run_id"])
        )


def test_two_node_run_requeued_mid_run_resumes_on_both_nodes(uninterrupted, results):
    folder, [job_id] = submit(results, "mnrequeue", *TWO_NODES)
    wait_running_with_checkpoint(folder, job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    [row] = wait_done(folder)
    assert row["state"] == "COMPLETED", row
    rec = record(folder)
    assert_two_hosts(rec)
    ck = rec["checkpointing"]
    assert ck["resumes"] == 1 and ck["resumed_from_iteration"] > 0, ck
    assert rec["slurm"]["restart_count"] == "1"
    # bit for bit the uninterrupted 2-node run: every evaluation, the final accuracy
    ref = uninterrupted["record"]
    assert rec["metrics"]["history"] == ref["metrics"]["history"]
    assert rec["metrics"]["test_accuracy"] == ref["metrics"]["test_accuracy"]
    assert [s for s, _ in final_attempts(job_id)] == ["REQUEUED", "COMPLETED"]


@pytest.mark.parametrize("dies", ["rank 1's node", "the batch host"])
def test_node_failure_mid_run_is_requeued_onto_the_nodes_left_and_resumes(
    uninterrupted, results, monkeypatch, dies
):
    """A node of a running 2-node job loses power: rank 1's, or the batch host (rank 0's, where the
    job's batch script and srun run). The rank left stops on its collective timeout and writes no
    result; SLURM marks the node down, requeues the job onto the nodes left, and it resumes from the
    last periodic checkpoint, bit for bit the uninterrupted run."""
    # the ranks' collective timeout, shorter than SLURM's SlurmdTimeout: the survivor gives up first
    monkeypatch.setenv("MNIST_JOBS_DIST_TIMEOUT_S", "8")
    name = "mnnodefail" if dies == "rank 1's node" else "mnbatchfail"
    folder, [job_id] = submit(results, name, *TWO_NODES)
    wait_running_with_checkpoint(folder, job_id)
    nodes = expand(squeue(job_id, "%N"))
    batch_host = squeue(job_id, "%B")
    assert batch_host == nodes[0], (batch_host, nodes)  # rank 0 runs where the batch script does
    killed, survivor_rank = (nodes[1], 0) if dies == "rank 1's node" else (batch_host, 1)
    killed_at = time.monotonic()
    subprocess.run(["bash", str(CLUSTER), "kill-node", killed], check=True, capture_output=True, timeout=60)
    try:
        # a node of the job is gone: no result may appear for this attempt, failed or otherwise
        deadline = time.monotonic() + 120
        while squeue(job_id, "%T") == "RUNNING" and expand(squeue(job_id, "%N")) == nodes:
            assert not (folder / f"{RUN_ID}.json").exists(), record(folder)
            assert time.monotonic() < deadline, "the job still runs on the dead node"
            time.sleep(0.5)
        [row] = wait_done(folder, 240)
        assert row["state"] == "COMPLETED", row
        rec = record(folder)
        assert_two_hosts(rec)
        assert killed not in rec["distributed"]["hosts"]  # it finished on the nodes left
        ck = rec["checkpointing"]
        assert ck["resumes"] == 1 and ck["resumed_from_iteration"] % 250 == 0, ck  # a periodic checkpoint
        ref = uninterrupted["record"]
        assert rec["metrics"]["history"] == ref["metrics"]["history"]
        assert rec["metrics"]["test_accuracy"] == ref["metrics"]["test_accuracy"]
        attempts = final_attempts(job_id)
        assert attempts[0][0] == "NODE_FAIL" and killed in expand(attempts[0][1]), attempts
        assert attempts[-1][0] == "COMPLETED" and len(attempts) == 2, attempts
        assert squeue(job_id, "%T") == ""  # nothing left in the queue
        # the survivor stopped on the collective timeout, before SLURM noticed the node
        err = (folder / "logs" / f"{job_id}_{survivor_rank}_log.err").read_text()
        assert "lost its peers" in err and (survivor_rank == 1 or "Timed out" in err), err[-2000:]
        status = runner.invoke(app, ["status", name, "--results-dir", str(results)], env={"COLUMNS": "200"})
        assert status.exit_code == 0
        assert "NODE_FAIL" in status.output and "requeued 1x" in status.output, status.output
        print(f"{dies} lost; to the completed result: {time.monotonic() - killed_at:.1f} s")
    finally:
        subprocess.run(["bash", str(CLUSTER), "revive-node", killed], capture_output=True, timeout=60)
        deadline = time.monotonic() + 60
        while subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, f"{killed} did not come back"
            time.sleep(0.5)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--nodes", str(CLUSTER_NODES + 1)], f"--nodes {CLUSTER_NODES + 1} does not fit: partition gpu has"),
        (["--nodes", "2", "--gpus-per-node", "3"], "--gpus-per-node 3 does not fit"),
        (["--nodes", "2", "--cpus-per-task", "5", "--tasks-per-node", "2"], "= 10 CPUs does not fit"),
    ],
)
def test_nodes_or_per_node_resources_beyond_the_partition_are_refused(cluster, results, extra, needle):
    res = runner.invoke(
        app, ["sweep", *ARGS, "--partition", "gpu", *extra, "--name", "big", "--results-dir", str(results)]
    )
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], res.output
    assert "Traceback" not in res.output
    assert not [p for p in results.rglob("*") if p.is_file()]  # nothing written, nothing submitted


SECOND = {
    "MNIST_JOBS_SLURM_DIR": "/tmp/mnist-jobs-slurm-second",
    "MNIST_JOBS_SLURM_CONF_DIR": "/tmp/mnist-jobs-slurm-second/conf",
    "MNIST_JOBS_SLURM_DB_PORT": "3317",
    "MNIST_JOBS_SLURM_CTLD_PORT": "6827",
    "MNIST_JOBS_SLURM_SLURMD_PORT": "6828",
    "MNIST_JOBS_SLURM_DBD_PORT": "6829",
    "MNIST_JOBS_SLURM_NODE_PREFIX": "mjsecond",
    "MNIST_JOBS_SLURM_BRIDGE": "mjbr9",
    "MNIST_JOBS_SLURM_SUBNET": "10.251.9",
}


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _daemons() -> dict[str, list[str]]:
    names = ("slurmctld", "slurmd", "slurmdbd", "mariadbd", "mysqld", "munged")
    return {
        n: subprocess.run(["pgrep", "-x", n], capture_output=True, text=True).stdout.split() for n in names
    }


def test_a_second_cluster_on_other_ports_does_not_collide_and_stop_removes_all_it_added(cluster):
    """A second 2-node cluster (own state dir, configs, ports, names, bridge) beside the running one:
    both answer with their own nodes; stopping the second removes its daemons, namespaces, bridge and
    /etc/hosts lines and leaves the first as it was."""
    import os

    env = {**os.environ, **SECOND}
    hosts_before, netns_before, daemons_before = Path("/etc/hosts").read_text(), _netns(), _daemons()
    try:
        started = subprocess.run(
            ["bash", str(CLUSTER), "start", "--nodes", "2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert started.returncode == 0, started.stderr[-3000:]
        conf = {**env, "SLURM_CONF": f"{SECOND['MNIST_JOBS_SLURM_CONF_DIR']}/slurm.conf"}
        ran = subprocess.run(
            ["srun", "-N2", "hostname"], env=conf, capture_output=True, text=True, timeout=60
        )
        assert sorted(ran.stdout.split()) == ["mjsecond1", "mjsecond2"], ran
        assert {"mjsecond1", "mjsecond2"} <= _netns()
        running = _daemons()
        second_daemons = {n: sorted(set(running[n]) - set(daemons_before[n])) for n in running}
        first = subprocess.run(["srun", "-N3", "hostname"], capture_output=True, text=True, timeout=60)
        assert sorted(first.stdout.split()) == sorted(cluster), first  # the first cluster, unaffected
    finally:
        stopped = subprocess.run(
            ["bash", str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=120
        )
    assert stopped.returncode == 0, stopped.stderr
    assert Path("/etc/hosts").read_text() == hosts_before and _netns() == netns_before
    assert subprocess.run(
        ["ip", "link", "show", SECOND["MNIST_JOBS_SLURM_BRIDGE"]], capture_output=True
    ).returncode
    after = _daemons()
    for name, pids in second_daemons.items():  # the second's slurmctld, slurmd x2, slurmdbd, mariadb
        assert not set(pids) & set(after[name]), (name, pids, after[name])
    assert second_daemons["slurmd"] and second_daemons["slurmctld"], second_daemons
    assert subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode == 0  # first: up
