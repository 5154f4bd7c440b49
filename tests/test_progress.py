"""Progress counts runs, not tasks: a local sweep's bar (a pack of 4 is 4 runs) and `status --wait`
(also for SLURM sweeps), each with completed / failed and the best accuracy so far."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from conftest import terminal_job
from rich.console import Console
from typer.testing import CliRunner

from mnist_jobs.cli import _runs_bar, app
from mnist_jobs.sweepdir import RunState

runner = CliRunner()
FAST = ["--iters", "20", "--eval-every", "10", "--device", "cpu"]
BAR = re.compile(r"^runs [━╸╺ ]+ (\d+)/(\d+) (.*)$", re.MULTILINE)  # (no colours: an empty bar is blank)


def bar_lines(output: str) -> list[tuple[int, int, str]]:
    return [(int(a), int(b), rest) for a, b, rest in BAR.findall(output)]


def test_a_packed_local_sweep_counts_its_runs(tmp_path):
    """4 configs in one pack, one of them diverging: the bar says 4/4 runs, 3 completed, 1 failed."""
    args = ["sweep", "--lr", "0.05,0.1,0.2,100", "--weight-decay", "1", "--pack", "4", *FAST,
            "--executor", "debug", "--name", "p4", "--results-dir", str(tmp_path)]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output  # a diverged run fails the sweep
    assert "1 task(s) completed, 0 failed; 1 run(s) failed" in res.output  # one task ...
    [(done, total, counts)] = bar_lines(res.output)  # ... and four runs
    assert (done, total) == (4, 4), res.output
    best = max(float(x) for x in re.findall(r"completed\s+([\d.]+)%", res.output))
    assert counts.startswith(f"3 completed, 1 failed, best {best:.2f}%"), counts

    waited = runner.invoke(app, ["status", "p4", "--wait", "--results-dir", str(tmp_path)])
    assert waited.exit_code == 0, waited.output
    assert bar_lines(waited.output) == [(4, 4, f"3 completed, 1 failed, best {best:.2f}%")]
    plain = runner.invoke(app, ["status", "p4", "--results-dir", str(tmp_path)])
    assert bar_lines(plain.output) == [(4, 4, f"3 completed, 1 failed, best {best:.2f}%")]


def test_an_unpacked_sweep_counts_the_same(tmp_path):
    args = ["sweep", "--lr", "0.05,0.1", *FAST, "--executor", "debug", "--name", "u",
            "--results-dir", str(tmp_path)]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    [(done, total, counts)] = bar_lines(res.output)
    assert (done, total) == (2, 2) and counts.startswith("2 completed, 0 failed, best "), res.output


def test_the_runs_bar_of_a_sweep_in_flight():
    """What `status --wait` shows while a SLURM sweep runs: done = completed + failed (+ missing)."""
    rows = [
        {"state": RunState.COMPLETED, "test_accuracy": 91.234},
        {"state": RunState.COMPLETED, "test_accuracy": 88.0},
        {"state": RunState.FAILED, "test_accuracy": None},
        {"state": RunState.RUNNING, "test_accuracy": None},
        {"state": RunState.RUNNING, "test_accuracy": None},
        {"state": RunState.PENDING, "test_accuracy": None},
    ]
    out = StringIO()
    Console(file=out, width=120).print(_runs_bar(rows))
    assert bar_lines(out.getvalue()) == [(3, 6, "2 completed, 1 failed, 1 pending, 2 running, best 91.23%")]
    out = StringIO()
    Console(file=out, width=120).print(_runs_bar([{"state": RunState.PENDING, "test_accuracy": None}] * 4))
    assert bar_lines(out.getvalue()) == [(0, 4, "0 completed, 0 failed, 4 pending")]


@pytest.mark.slurm
def test_status_wait_counts_the_runs_of_a_packed_slurm_sweep(cluster, results):
    """On the real cluster: 4 runs in 2 packs; `status --wait` follows them to the end and counts
    4/4 runs (not 2/2 tasks), all completed, with the best accuracy."""
    args = ["sweep", "--lr", "0.01,0.02,0.05,0.1", "--pack", "2", "--partition", "gpu", *FAST,
            "--name", "packwait", "--results-dir", str(results)]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "submitted 4 run(s) as 2 task(s)" in res.output, res.output
    waited = runner.invoke(app, ["status", "packwait", "--wait", "--results-dir", str(results)])
    assert waited.exit_code == 0, waited.output
    [(done, total, counts)] = bar_lines(waited.output)
    assert (done, total) == (4, 4), waited.output
    assert re.fullmatch(r"4 completed, 0 failed, best \d+\.\d\d%", counts), counts


def test_ctrl_c_stops_following_a_sweep_not_its_jobs(tmp_path):
    """`status --watch` of a sweep training in another terminal, then Ctrl-C: it stops following
    (exit 130, one line that says how to look again or cancel), and the run trains on; `cancel` then
    stops it."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from mnist_jobs.sweepdir import run_states

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "mnist_jobs", *args, "--results-dir", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=terminal_job,
        )  # fmt: skip

    sweep = start("sweep", "--iters", "2000000", "--eval-every", "1000000", "--device", "cpu", "--name", "w")
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / "w" / "sweep.json").exists() and run_states(tmp_path / "w")[0]["state"].live):
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()
            time.sleep(0.1)
        # how far it has got: its job's note, in `status` (a column of its own) until it ends
        while not (note := run_states(tmp_path / "w")[0]["progress"]) or note["iteration"] < 50:
            assert time.monotonic() < deadline, run_states(tmp_path / "w")
            time.sleep(0.1)
        assert note["iters"] == 2000000 and note["test_accuracy"] is None, note  # (no evaluation yet)
        shown = CliRunner().invoke(
            app, ["status", "w", "--results-dir", str(tmp_path)], env={"COLUMNS": "200"}
        )
        assert "progress" in shown.output and re.search(r" \d+/2000000 \(\d+%\)", shown.output), shown.output
        watch = start("status", "w", "--watch")
        time.sleep(3)  # (python start-up, then the first refresh)
        os.killpg(watch.pid, signal.SIGINT)
        out = watch.communicate(timeout=60)[0]
        assert watch.returncode == 130, out
        assert "stopped following w: its jobs go on" in out and "Traceback" not in out, out
        assert sweep.poll() is None and str(run_states(tmp_path / "w")[0]["state"]) == "RUNNING"
        said = CliRunner().invoke(app, ["cancel", "w", "--results-dir", str(tmp_path)])
        assert "stopped 1 local job(s)" in said.output, said.output
        assert sweep.wait(timeout=120) == 130  # interrupted: its run checkpointed
        assert not list((tmp_path / "w").glob(".*.progress*"))  # (removed as the run ended)
        assert run_states(tmp_path / "w")[0]["progress"] is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)


def test_a_pack_notes_each_runs_progress_while_it_trains_and_removes_the_notes_as_it_ends(tmp_path):
    """The job's side, in process: a pack of 2 notes the same iteration for both runs while it trains
    (no loss or accuracy: a pack's figures are means, not one run's), and leaves no note behind. A note
    left by a killed job is never shown: `status` reads notes of claimed runs only."""
    import json
    import threading
    import time

    from mnist_jobs.claims import progress_path, read_progress
    from mnist_jobs.config import TrainConfig
    from mnist_jobs.grid import sweep_run_id
    from mnist_jobs.job import TrainTask
    from mnist_jobs.sweepdir import record_submission, run_states

    cfgs = [TrainConfig(lr=lr, iters=12000, eval_every=6000, device="cpu") for lr in (0.01, 0.02)]
    ids = [sweep_run_id(c) for c in cfgs]
    task = TrainTask(configs=[c.to_dict() for c in cfgs], run_ids=ids, results_dir=str(tmp_path), threads=1)
    seen: list[tuple] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            notes = [read_progress(tmp_path, r) for r in ids]
            # both notes of one write (one `at`): a read between the job's two renames sees one new
            # note and one old, and is left out (the files are written one after the other)
            if all(notes) and len({n["at"] for n in notes}) == 1:
                seen.append(tuple((n["iteration"], n["iters"], n.get("train_loss")) for n in notes))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        said = task()
    finally:
        done.set()
        watcher.join()
    assert [o["status"] for o in said] == ["completed", "completed"]
    assert seen, "no progress note seen while the pack trained"
    assert all(a == b and a[1] == 12000 and a[2] is None and 0 < a[0] <= 12000 for a, b in seen), seen[:3]
    assert not list(tmp_path.glob(".*.progress*"))
    # a note of a job killed mid-run (left behind): no claim is held, so nothing is shown
    entry = {"config": cfgs[0].to_dict(), "executor": "local"}
    record_submission(tmp_path, name="p", executor="local", grid={}, slurm=None, runs={ids[0]: entry})
    progress_path(tmp_path, ids[0]).write_text(json.dumps({"iteration": 7, "iters": 30000}))
    assert run_states(tmp_path)[0]["progress"] is None
