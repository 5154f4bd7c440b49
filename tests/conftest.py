from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest


def terminal_job() -> None:
    """preexec_fn of a child that a test signals as a terminal would (Ctrl-C's SIGINT, a closed
    terminal's SIGHUP): both at their defaults, as a shell gives its foreground job, whatever this
    pytest inherited. Started with `&` by a script, a process has SIGINT ignored, and under nohup
    SIGHUP, and its children keep that (as mnist-jobs itself honours: test_matrix's ignored-signal test)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


REPO = Path(__file__).resolve().parent.parent
RAW = REPO / "data" / "MNIST" / "raw"
CLUSTER = REPO / "slurm" / "cluster.sh"


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    """A private copy of the shipped .gz files (a test may corrupt it)."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in RAW.glob("*.gz"):
        shutil.copy(gz, raw / gz.name)
    return tmp_path / "data"


# The SLURM tests share one real cluster of CLUSTER_NODES nodes (slurm/cluster.sh): each node a slurmd
# with its own hostname and address (network + UTS namespaces on a private bridge), all on this
# filesystem. Three, so that a 2-node job whose node dies can be requeued onto the other two.
CLUSTER_NODES = int(os.environ.get("MNIST_JOBS_TEST_NODES", "3"))


@pytest.fixture
def one_thread():
    """Runs compared bit for bit use the same thread count: on the CPU, a different split of the work
    changes float sums in the last bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cluster() -> list[str]:
    """The real SLURM cluster, started once per session and stopped at the end (pass or fail): its
    node names."""
    started = subprocess.run(
        ["bash", str(CLUSTER), "start", "--nodes", str(CLUSTER_NODES)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if started.returncode != 0:
        msg = f"cannot start the SLURM test cluster:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        nodes = subprocess.run(["bash", str(CLUSTER), "nodes"], capture_output=True, text=True, check=True)
        yield nodes.stdout.split()
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


@pytest.fixture
def results(tmp_path_factory) -> Path:
    # Not under /tmp's pytest dir only for tidiness: the one-node cluster shares this filesystem.
    return tmp_path_factory.mktemp("slurm-results")


def wait_done(folder: Path, timeout_s: float = 240) -> list[dict]:
    """The run states of a sweep once every run has ended (completed, failed or cancelled)."""
    from mnist_jobs.sweepdir import run_states

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = run_states(folder)
        if rows and all(r["state"] in ("COMPLETED", "FAILED", "CANCELLED") for r in rows):
            return rows
        time.sleep(1.0)
    raise AssertionError(f"sweep {folder.name} not done after {timeout_s}s: {run_states(folder)}")
