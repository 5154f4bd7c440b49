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


# ---- two lanes ----------------------------------------------------------------------------------
#
# The SLURM tests (those using the `cluster` fixture) mostly wait: for slurmctld's timers (a dead node
# is declared down after ~30 s, a requeued job is held ~12 s) and for jobs to start on the nodes. The
# others mostly compute. So a session that selects both runs the SLURM tests in a second pytest process
# beside this one, with the same arguments, started as collection ends, at a lower priority (nice 10).
# That lane's report is printed at the end of this one's, and its failure fails the session (exit
# status). `--one-lane` runs everything in this process, one test after another.

LANE_ENV = "MNIST_JOBS_TEST_LANE"  # "slurm": this process is the second lane


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--one-lane",
        action="store_true",
        default=False,
        help="run the SLURM tests in this process after the others, not in a second pytest process beside them",
    )


def _needs_cluster(item: pytest.Item) -> bool:
    return "cluster" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    if os.environ.get(LANE_ENV) == "slurm":  # the second lane: the SLURM tests alone
        items[:] = [i for i in items if _needs_cluster(i)]
        return
    if config.getoption("one_lane") or config.option.collectonly:
        return
    slurm = [i for i in items if _needs_cluster(i)]
    if not slurm or len(slurm) == len(items):
        return
    items[:] = [i for i in items if not _needs_cluster(i)]
    import sys
    import tempfile

    factory = getattr(config, "_tmp_path_factory", None)  # (this session's basetemp: kept likewise)
    root = factory.getbasetemp() if factory is not None else Path(tempfile.mkdtemp(prefix="pytest-lanes-"))
    log = root / "slurm-lane.log"
    args = [*config.invocation_params.args, f"--basetemp={root / 'slurm-lane'}"]
    with open(log, "wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "pytest", *args],
            cwd=config.invocation_params.dir,
            env={**os.environ, LANE_ENV: "slurm"},
            stdout=out,
            stderr=subprocess.STDOUT,
            # Niced, with the cluster it starts and its jobs: that lane mostly waits on timers, and takes
            # the cores this one leaves. At equal priority it preempts this lane's OpenMP teams, whose
            # threads then spin on a barrier for the one it holds: a run here went 6x slower.
            preexec_fn=lambda: os.nice(10),
        )
    config.stash[_LANE] = (child, log, len(slurm))


_LANE = pytest.StashKey[tuple]()


def _wait_for_lane(config: pytest.Config) -> tuple[int, Path, int] | None:
    """The SLURM lane's exit status, log and test count, once it has ended (None: no second lane)."""
    lane = config.stash.get(_LANE, None)
    if lane is None:
        return None
    child, log, n = lane
    try:
        rc = child.wait()
    except BaseException:  # Ctrl-C while waiting: it has the signal too (same process group)
        _stop_lane(child)
        raise
    return rc, log, n


def _stop_lane(child: subprocess.Popen) -> None:
    """Interrupt the second lane as Ctrl-C would (its fixtures' teardown stops the cluster), then kill."""
    if child.poll() is None:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=180)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    lane = session.config.stash.get(_LANE, None)
    if lane is not None and (exitstatus == pytest.ExitCode.INTERRUPTED or session.shouldfail):
        _stop_lane(lane[0])  # interrupted, or -x / --maxfail reached here: that lane stops too
    done = _wait_for_lane(session.config)
    if done is None:
        return
    rc = done[0]
    # no tests collected there (5) is no failure; anything else that is not 0 fails the session
    if rc not in (0, 5) and session.exitstatus == 0:
        session.exitstatus = rc


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lane = config.stash.get(_LANE, None)
    if lane is None:
        return
    child, log, n = lane
    rc = child.wait()
    terminalreporter.section(f"SLURM lane: {n} test(s) in a second pytest process beside this one ({log})")
    terminalreporter.write(log.read_text(errors="replace"))
    verdict = "passed" if rc in (0, 5) else f"FAILED (exit {rc})"
    terminalreporter.write_line(
        f"SLURM lane {verdict}; this process's own tests are counted below", bold=True
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    lane = config.stash.get(_LANE, None)
    if lane is not None:
        _stop_lane(lane[0])  # (an interrupted session: never leave it running)
