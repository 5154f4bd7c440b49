"""Defects found where two features meet (issue 13), each held by a test that failed before its fix:
TOML sweep files decide the executor and name misspelled keys; a corrupt sweep.json is one line, not a
traceback, and does not hide the other sweeps; --force deletes nothing when the command is refused;
a bad --device leaves no folder behind. (Strict JSON and file modes: test_results.py; control
characters and --momentum: test_bad_input.py; claims under status polling: test_checkpoint.py; the
TOML file submitted to the real cluster: test_slurm.py.)"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mnist_jobs import checkpoint as ckpt
from mnist_jobs.cli import app
from mnist_jobs.config import ConfigError, TrainConfig
from mnist_jobs.grid import expand_grid, sweep_run_id
from mnist_jobs.launch import SweepOptions

runner = CliRunner()
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_toml() -> str:
    """README's own example sweep file, verbatim."""
    return re.search(r"```toml\n(.*?)```", README.read_text(), re.S).group(1)


def test_readme_toml_slurm_table_decides_the_executor(tmp_path):
    path = tmp_path / "lr-study.toml"
    path.write_text(readme_toml())
    opts = SweepOptions.from_sources(
        training={}, slurm={}, config_file=path, results_dir=tmp_path / "r", data_dir=None
    )
    assert opts.executor == "slurm" and opts.slurm.partition == "gpu" and opts.slurm.time_min == 30
    assert opts.name == "lr-study" and opts.grid["lr"] == [0.001, 0.01, 0.1]
    # the dry run says so too (without SLURM installed: it only renders the script)
    res = runner.invoke(
        app, ["sweep", "--config", str(path), "--dry-run", "--results-dir", str(tmp_path / "r")]
    )
    assert res.exit_code == 0, res.output
    assert "executor slurm" in res.output and "#SBATCH --partition=gpu" in res.output
    assert "#SBATCH --time=30" in res.output
    # the command line still overrides the file
    cli = SweepOptions.from_sources(
        training={}, slurm={"time_min": 5}, config_file=path, results_dir=tmp_path / "r", data_dir=None
    )
    assert cli.slurm.time_min == 5 and cli.slurm.partition == "gpu"
    local = SweepOptions.from_sources(
        training={}, slurm={}, config_file=path, executor="local", results_dir=tmp_path / "r"
    )
    assert local.executor == "local"


@pytest.mark.parametrize(("in_file", "on_cli"), [("epochs = 5", "--iters"), ("iters = 3000", "--epochs")])
def test_iters_or_epochs_on_the_command_line_overrides_the_other_in_the_file(tmp_path, in_file, on_cli):
    """They say one thing two ways: a file's `epochs = 5` with --iters 200 (a quick try of the file)
    trains 200 iterations rather than refusing both; in the file alone, both still are refused."""
    path = tmp_path / "s.toml"
    path.write_text(f"lr = [0.1, 0.2]\n{in_file}\n")
    res = runner.invoke(app, ["sweep", "--config", str(path), on_cli, "2", "--dry-run",
                              "--results-dir", str(tmp_path / "r")])  # fmt: skip
    assert res.exit_code == 0, res.output
    key = on_cli.removeprefix("--")
    opts = SweepOptions.from_sources(training={key: "2"}, slurm={}, config_file=path, results_dir=tmp_path)
    [iters] = {c.iters for c in expand_grid(opts.grid)}
    assert iters == (2 if key == "iters" else 2 * 600)
    path.write_text("lr = [0.1]\niters = 10\nepochs = 1\n")
    res = runner.invoke(app, ["sweep", "--config", str(path), "--dry-run", "--results-dir", str(tmp_path)])
    assert res.exit_code == 2 and "not both" in res.output, res.output


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('lr = [0.1]\n[slurm]\nparttion = "gpu"\n', "'parttion'"),
        ("lrr = [0.1]\n", "'lrr'"),
        ("lr = [0.1]\nslurm = 3\n", "[slurm] must be a table"),
    ],
)
def test_misspelled_sweep_file_keys_name_themselves_and_the_valid_ones(tmp_path, text, needle):
    path = tmp_path / "s.toml"
    path.write_text(text)
    res = runner.invoke(
        app, ["sweep", "--config", str(path), "--dry-run", "--results-dir", str(tmp_path / "r")]
    )
    assert res.exit_code == 2, res.output
    [line] = res.output.strip().splitlines()
    assert line.startswith("Error: ") and needle in line, line
    if "table" not in needle:
        assert "valid:" in line and ("partition" in line if "parttion" in needle else "batch_size" in line)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError):
        SweepOptions.from_sources(training={}, slurm={}, config_file=path, results_dir=tmp_path)


def test_dashed_keys_in_a_sweep_file_are_accepted(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('batch-size = [50, 100]\niters = 10\n[slurm]\ntime-min = 7\npartition = "gpu"\n')
    opts = SweepOptions.from_sources(training={}, slurm={}, config_file=path, results_dir=tmp_path)
    assert opts.grid["batch_size"] == [50, 100] and opts.slurm.time_min == 7


def test_a_sweep_file_for_the_cluster_run_locally_says_which_slurm_options_it_ignores(tmp_path):
    """`--executor local` over a file with a [slurm] table (the cluster's sweep, debugged on a laptop)
    trains here, and says, on one line, which SLURM options it leaves out and where each came from;
    --tasks-per-node runs here too, so it is not among them."""
    path = tmp_path / "s.toml"
    path.write_text('lr = [0.1]\niters = 10\neval-every = 5\n[slurm]\npartition = "gpu"\ntime-min = 7\n')
    common = ["--device", "cpu", "--results-dir", str(tmp_path / "r")]
    res = runner.invoke(
        app, ["sweep", "--config", str(path), "--executor", "local", "--mem-gb", "4", *common]
    )
    assert res.exit_code == 0, res.output
    [warning] = [ln for ln in res.output.splitlines() if ln.startswith("Warning:")]
    where = f"--config {path} [slurm]"
    assert warning.endswith(f"ignored: --partition ({where}), --time-min ({where}), --mem-gb"), warning
    assert "completed" in res.output  # ... and it trained here
    quiet = runner.invoke(app, ["sweep", "--lr", "0.1", "--iters", "10", "--tasks-per-node", "1", *common])
    assert quiet.exit_code == 0 and "Warning" not in quiet.output, quiet.output
    # on SLURM nothing is ignored (a dry run: no cluster needed to plan it)
    opts = SweepOptions.from_sources(training={}, slurm={}, config_file=path, results_dir=tmp_path)
    assert opts.executor == "slurm" and opts.ignored_here == []


CORRUPT = {
    "not-json": "{this is not json",
    "foreign": json.dumps({"kind": "someone-else/manifest", "runs": {}}),
    "no-runs": json.dumps({"kind": "mnist-jobs/sweep", "runs": 3}),
    "a-list": "[1, 2, 3]",
}


@pytest.mark.parametrize("what", list(CORRUPT))
def test_a_corrupt_sweep_json_is_one_line_and_hides_no_other_sweep(tmp_path, what):
    good = runner.invoke(
        app,
        ["sweep", "--lr", "0.1", "--iters", "10", "--eval-every", "5", "--device", "cpu", "--name", "good",
         "--results-dir", str(tmp_path)],
    )  # fmt: skip
    assert good.exit_code == 0, good.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "sweep.json").write_text(CORRUPT[what])
    for args in (["status", "bad"], ["cancel", "bad"], ["logs", "bad"]):
        res = runner.invoke(app, [*args, "--results-dir", str(tmp_path)])
        assert res.exit_code == 2, (args, res.output)
        [line] = res.output.strip().splitlines()
        assert line.startswith("Error: ") and "sweep.json" in line and "no sweep.json" not in line, line
        assert res.exception is None or isinstance(res.exception, SystemExit)
    listing = runner.invoke(app, ["status", "--results-dir", str(tmp_path)], env={"COLUMNS": "300"})
    assert listing.exit_code == 0, listing.output
    assert "good" in listing.output and "unreadable" in listing.output
    again = runner.invoke(
        app, ["sweep", "--lr", "0.1", "--iters", "10", "--device", "cpu", "--name", "bad", "--results-dir",
              str(tmp_path)],
    )  # fmt: skip
    last = again.output.strip().splitlines()[-1]
    assert again.exit_code == 2 and last.startswith("Error: ") and "sweep.json" in last, again.output


def test_force_deletes_no_checkpoint_when_the_command_is_refused(tmp_path):
    """--force used to delete checkpoints before the remaining checks; now the job itself starts
    afresh when it really runs, so a refused command leaves every checkpoint where it was."""
    cfgs = [TrainConfig(model="cnn", batch_size=30000, iters=1, seed=s, device="cpu") for s in range(8)]
    ids = [sweep_run_id(c) for c in cfgs]
    folder = tmp_path / "big"
    folder.mkdir()
    kept = [ckpt.population_path(folder, ids), *(ckpt.checkpoint_path(folder, r) for r in ids)]
    for p in kept:
        p.write_bytes(b"an earlier attempt's checkpoint")
    res = runner.invoke(
        app,
        ["sweep", "--model", "cnn", "--batch-size", "30000", "--iters", "1", "--seed", "0,1,2,3,4,5,6,7",
         "--device", "cpu", "--pack", "8", "--force", "--name", "big", "--results-dir", str(tmp_path)],
    )  # fmt: skip
    assert res.exit_code == 2 and "use --pack" in res.output, res.output  # 8 x 5.7 GB do not fit here
    assert all(p.exists() for p in kept)


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_bad_device_creates_no_results_folder(tmp_path, command):
    target = tmp_path / "results"
    device = "mps" if sys.platform != "darwin" else "cuda:99"
    res = runner.invoke(app, [command, "--device", device, "--iters", "5", "--results-dir", str(target)])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1].startswith("Error: --device") and not target.exists()


def test_a_pack_with_one_diverged_run_fails_the_local_sweep(tmp_path):
    """A pack task can complete while one of its runs diverged: the sweep still says so and exits 1."""
    res = runner.invoke(
        app,
        ["sweep", "--lr", "0.1,100", "--weight-decay", "1", "--pack", "2", "--iters", "60", "--eval-every",
         "30", "--device", "cpu", "--name", "div", "--results-dir", str(tmp_path)],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "1 run(s) failed" in res.output
    recs = [json.loads(p.read_text()) for p in (tmp_path / "div").glob("logreg-*.json")]
    assert sorted(r["status"] for r in recs) == ["completed", "failed"]
    [bad] = [r for r in recs if r["status"] == "failed"]
    assert bad["error"]["type"] == "Diverged" and bad["config"]["lr"] == 100
    # status says why, in a column of its own
    status = runner.invoke(app, ["status", "div", "--results-dir", str(tmp_path)], env={"COLUMNS": "250"})
    [line] = [ln for ln in status.output.splitlines() if bad["run_id"] in ln]
    assert "FAILED" in line and "train loss became NaN at iteration 30" in line, status.output


def test_a_local_job_starts_with_sigint_held_and_a_ctrl_c_meanwhile_is_not_lost():
    """local.run_local starts each job with SIGINT blocked: the job's processes inherit the mask (so
    submitit's controller never sees the terminal's Ctrl-C; TrainTask unblocks it as it trains), and a
    SIGINT that reaches the sweep meanwhile (`cancel`'s) is held and raised as the start ends."""
    import os
    import signal
    import subprocess

    from mnist_jobs.local import _sigint_held_for_children

    def blocked(pid: int) -> bool:
        status = Path(f"/proc/{pid}/status").read_text()
        mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.MULTILINE).group(1), 16)
        return bool(mask >> (signal.SIGINT - 1) & 1)

    import threading
    import time

    # another thread, as the sweep has (rich's refresh): the kernel may hand it the signal
    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
    inside = False
    # Python's Ctrl-C, as in a terminal (a pytest started with `&` inherits SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), _sigint_held_for_children():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            os.kill(os.getpid(), signal.SIGINT)  # held: nothing is raised inside the block
            time.sleep(0.2)
            inside = True
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert inside and blocked(child.pid) and not blocked(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_a_stop_signal_arriving_inside_the_handler_of_another_never_deadlocks():
    """Ctrl-C's SIGINT, then the SIGTERM the local controller forwards, can land a few bytecodes
    apart: Python then runs the second handler inside the first. StopFlag was a threading.Event, whose
    set() takes a lock, so the nested set() waited for its own caller for ever (found hung in the
    Ctrl-C matrix case). 20000 signals from another process, each landing where it may; it must end."""
    import subprocess

    code = (
        "import os, signal, subprocess, sys\n"
        "from mnist_jobs.train import StopFlag, stopping_on\n"
        "stop = StopFlag()\n"
        "with stopping_on(stop, (signal.SIGTERM, signal.SIGINT)):\n"
        "    blaster = subprocess.Popen([sys.executable, '-c', 'import os, signal\\n"
        "for i in range(20000): os.kill(%d, signal.SIGINT if i %% 2 else signal.SIGTERM)' % os.getpid()])\n"
        "    while blaster.poll() is None:\n"
        "        stop.is_set()\n"
        "assert stop.is_set() and stop.signum in (signal.SIGINT, signal.SIGTERM)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()  # (SIGKILL: a deadlocked one takes its SIGTERMs as stop requests)
