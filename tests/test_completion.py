"""Shell completion through the real mechanism: the installed `mnist-jobs` script run the way bash and
zsh run it from a completion script (`_MNIST_JOBS_COMPLETE=complete_bash COMP_WORDS=... COMP_CWORD=...`),
completing sweep names for `status`, `logs` and `cancel` without importing torch or submitit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_jobs.sweepdir import record_submission

SCRIPT = Path(sys.executable).with_name("mnist-jobs")
if not SCRIPT.exists():
    SCRIPT = Path(shutil.which("mnist-jobs") or "mnist-jobs")


@pytest.fixture
def sweeps(tmp_path: Path) -> Path:
    """A results folder holding two sweeps (real manifests) and a folder that is no sweep."""
    results = tmp_path / "results"
    for name in ("lr-study", "lr-fine", "cnn-adam"):
        record_submission(results / name, name=name, executor="local", grid={}, slurm=None, runs={})
    (results / "not-a-sweep").mkdir()
    return results


def complete(words: str, cwd: Path, shell: str = "bash", **env: str) -> tuple[list[str], str]:
    """What the shell would be offered for the last (possibly empty) word of `words`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("_MNIST_JOBS")}
    if shell == "bash":
        parts = words.split(" ")
        base.update(COMP_WORDS=words, COMP_CWORD=str(len(parts) - 1))
    else:
        base.update(_TYPER_COMPLETE_ARGS=words)
    base.update(_MNIST_JOBS_COMPLETE=f"complete_{shell}", PYTHONPROFILEIMPORTTIME="1", **env)
    out = subprocess.run([str(SCRIPT)], cwd=cwd, env=base, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {
        line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")
    }
    assert not imported & {"torch", "submitit", "numpy"}, "completion imported a heavy module"
    return [w for w in out.stdout.splitlines() if w], out.stdout


@pytest.mark.parametrize("command", ["status", "logs", "cancel"])
def test_sweep_names_complete_in_bash(sweeps, command):
    names, _ = complete(f"mnist-jobs {command} ", cwd=sweeps.parent)  # the default results/
    assert sorted(names) == ["cnn-adam", "lr-fine", "lr-study"]
    names, _ = complete(f"mnist-jobs {command} lr-", cwd=sweeps.parent)
    assert sorted(names) == ["lr-fine", "lr-study"]


def test_results_dir_on_the_line_is_where_names_come_from(sweeps, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    names, _ = complete(f"mnist-jobs status --results-dir {sweeps} c", cwd=elsewhere)
    assert names == ["cnn-adam"]
    names, _ = complete("mnist-jobs status ", cwd=elsewhere)  # no results/ here: nothing to offer
    assert names == []


def test_sweep_names_complete_in_zsh(sweeps):
    _, out = complete(f"mnist-jobs cancel --results-dir {sweeps} ", cwd=sweeps.parent, shell="zsh")
    for name in ("lr-study", "lr-fine", "cnn-adam"):
        assert f'"{name}"' in out
    assert "not-a-sweep" not in out


def test_show_completion_prints_the_script():
    # typer's --show-completion is a flag that detects the shell from the parent processes, as in a
    # terminal: a bash that does not exec the command (two commands) is that parent here, wherever
    # pytest itself was started from
    out = subprocess.run(
        ["bash", "-c", '"$0" --show-completion; exit $?', str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "_MNIST_JOBS_COMPLETE=complete_bash" in out.stdout and "complete " in out.stdout
    helped = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert "--install-completion" in helped.stdout and "--show-completion" in helped.stdout
