"""Bad input through the real command line: one line `Error: ...`, exit code 2, no traceback, nothing
written, and no option value ever adds a line of its own to the sbatch script."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mnist_jobs.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_scontrol(monkeypatch):
    """Dry runs read MaxArraySize with `scontrol show config` (slow where a slurm.conf exists but no
    controller runs): answer for it, wherever it lives."""
    for module in ("mnist_jobs.launch", "mnist_jobs.slurm"):
        try:
            mod = importlib.import_module(module)
        except Exception:  # absent (or mid-refactor): nothing to patch there
            continue
        if hasattr(mod, "max_array_size"):
            monkeypatch.setattr(mod, "max_array_size", lambda: 5)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*")) if path.exists() else []


def refused(args: list[str], results: Path) -> str:
    """Run the command; it must fail with exactly one `Error:` line and leave nothing behind."""
    res = runner.invoke(app, [*args, "--results-dir", str(results)])
    out = res.output
    assert res.exit_code == 2, (args, res.exit_code, out)
    assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception), out)
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), (args, out)
    assert not any(line.startswith("#SBATCH") for line in out.splitlines()), out  # no script printed
    assert files_under(results) == [], files_under(results)
    return lines[0]


# ---- hyperparameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--momentum", "2"], "--momentum must be >= 0 and < 1 (got 2.0)"),
        (["--momentum", "1"], "--momentum must be >= 0 and < 1 (got 1.0)"),
        (["--momentum", "0.9,1.5"], "--momentum must be >= 0 and < 1 (got 1.5)"),
        (["--momentum", "-0.5"], "--momentum must be >= 0 and < 1 (got -0.5)"),
        (["--momentum", "nan"], "--momentum must be finite (got nan)"),
        (["--lr", "nan"], "--lr must be finite (got nan)"),
        (["--lr", "inf"], "--lr must be finite (got inf)"),
        (["--lr", "0.01,-inf"], "--lr must be finite (got -inf)"),
        (["--weight-decay", "inf"], "--weight-decay must be finite (got inf)"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0 (got -1.0)"),
        (
            ["--schedule", "cosine,linear"],
            "--schedule must be one of constant, cosine, onecycle (got 'linear')",
        ),
        (["--warmup", "0.1,1"], "--warmup is a fraction of the iterations: >= 0 and < 1 (got 1.0)"),
        (["--warmup", "-0.1"], "--warmup must be >= 0 (got -0.1)"),
        (["--warmup", "nan"], "--warmup must be finite (got nan)"),
        (["--normalize", "on,maybe"], "--normalize must be on or off (got 'maybe')"),
    ],
)
def test_sweep_refuses_bad_hyperparameters(tmp_path, extra, needle):
    args = ["sweep", "--lr", "0.01", *extra, "--device", "cpu"]
    assert needle in refused(args, tmp_path / "results")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--momentum", "1.0"], "--momentum must be >= 0 and < 1 (got 1.0)"),
        (["--momentum", "2"], "--momentum must be >= 0 and < 1 (got 2.0)"),
        (["--lr", "nan"], "--lr must be finite (got nan)"),
        (["--lr", "inf"], "--lr must be finite (got inf)"),
        (["--lr", "-inf"], "--lr must be finite (got -inf)"),
        (["--weight-decay", "nan"], "--weight-decay must be finite (got nan)"),
        (["--schedule", "step"], "--schedule must be one of constant, cosine, onecycle (got 'step')"),
        (["--schedule", "cosine,onecycle"], "--schedule takes one value in `train`"),
        (["--warmup", "1"], "--warmup is a fraction of the iterations: >= 0 and < 1 (got 1.0)"),
        (["--warmup", "ten"], "--warmup must be a number (got 'ten')"),
        (["--normalize", "2"], "--normalize must be on or off (got '2')"),
        (["--deskew", "slanted"], "--deskew must be on or off (got 'slanted')"),
    ],
)
def test_train_refuses_bad_hyperparameters(tmp_path, extra, needle):
    args = ["train", *extra, "--device", "cpu", "--iters", "1", "--eval-every", "1"]
    assert needle in refused(args, tmp_path / "results")


def test_sweep_momentum_from_a_file_is_checked_too(tmp_path):
    toml = tmp_path / "sweep.toml"
    toml.write_text("lr = 0.01\nmomentum = [0.9, 1.0]\n")
    line = refused(["sweep", "--config", str(toml), "--device", "cpu"], tmp_path / "results")
    assert "--momentum must be >= 0 and < 1 (got 1.0)" in line


@pytest.mark.parametrize(
    ("toml_text", "needle"),
    [
        (
            'schedule = ["cosine", "cyclic"]',
            "--schedule must be one of constant, cosine, onecycle (got 'cyclic')",
        ),
        ("warmup = [0.1, 1.5]", "--warmup is a fraction of the iterations: >= 0 and < 1 (got 1.5)"),
        ("normalize = [true, 7]", "--normalize must be on or off (got '7')"),
    ],
)
def test_sweep_file_schedule_and_normalize_are_checked_too(tmp_path, toml_text, needle):
    toml = tmp_path / "sweep.toml"
    toml.write_text(f"lr = 0.01\n{toml_text}\n")
    assert needle in refused(["sweep", "--config", str(toml), "--device", "cpu"], tmp_path / "results")


# ---- values that reach the sbatch script ---------------------------------------------------------

DRY = ["sweep", "--lr", "0.01", "--partition", "gpu", "--dry-run"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (
            ["--slurm-opt", "comment=a\n#SBATCH --uid=0"],
            "Error: --slurm-opt 'comment=a\\n#SBATCH --uid=0' contains a control character (\\n)",
        ),
        (["--slurm-opt", "comment\n#SBATCH --uid=0=a"], "Error: --slurm-opt 'comment\\n#SBATCH"),
        (
            ["--slurm-opt", "comment=a\r#SBATCH --uid=0"],
            "Error: --slurm-opt 'comment=a\\r#SBATCH --uid=0' contains a control character (\\r)",
        ),
        (["--slurm-opt", "=x"], "Error: --slurm-opt must be KEY=VALUE (got '=x')"),
        # options the launcher writes itself: a second #SBATCH line would win or break the job
        (["--slurm-opt", "array=0-3"], "Error: --slurm-opt array=0-3: the job array is the sweep's own"),
        (["--slurm-opt", "partition=cpu"], "Error: --slurm-opt partition=cpu: use --partition instead"),
        (["--slurm-opt", "--nodes=2"], "Error: --slurm-opt nodes=2: use --nodes instead"),
        (["--slurm-opt", "time=5"], "Error: --slurm-opt time=5: use --time-min instead"),
        (["--slurm-opt", "job_name=x"], "Error: --slurm-opt job-name=x: use --name instead"),
        (["--slurm-opt", "output=o.txt"], "Error: --slurm-opt output=o.txt: the job's logs go to"),
        (
            ["--setup", "echo hi\nrm -rf /"],
            "Error: --setup 'echo hi\\nrm -rf /' contains a control character (\\n)",
        ),
        (["--setup", "module load cuda", "--setup", "x\n#SBATCH --uid=0"], "Error: --setup 'x\\n#SBATCH"),
        (["--setup", "echo\thi"], "Error: --setup 'echo\\thi' contains a control character (\\t)"),
        (
            ["--partition", "gpu\n#SBATCH --uid=0"],
            "Error: --partition 'gpu\\n#SBATCH --uid=0' contains a control character (\\n)",
        ),
        (["--partition", ""], "Error: --partition must not be empty (got '')"),
        (["--account", "a\rb"], "Error: --account 'a\\rb' contains a control character (\\r)"),
        (["--qos", "normal\n#SBATCH --uid=0"], "Error: --qos 'normal\\n#SBATCH --uid=0' contains a control"),
        (
            ["--constraint", "a100\x1b"],
            "Error: --constraint 'a100\\x1b' contains a control character (\\x1b)",
        ),
    ],
)
def test_sbatch_values_with_control_characters_are_refused(tmp_path, extra, needle):
    # the later --partition wins over DRY's, so --partition cases test their own value
    line = refused([*DRY, *extra], tmp_path / "results")
    assert line.startswith(needle), line


def test_train_submission_refuses_them_too(tmp_path):
    args = ["train", "--partition", "gpu", "--slurm-opt", "comment=a\n#SBATCH --uid=0", "--dry-run"]
    line = refused(args, tmp_path / "results")
    assert line.startswith("Error: --slurm-opt 'comment=a\\n#SBATCH --uid=0' contains a control"), line


@pytest.mark.parametrize(
    ("slurm_table", "needle"),
    [
        (
            'partition = "gpu\\n#SBATCH --uid=0"',
            "Error: --partition 'gpu\\n#SBATCH --uid=0' contains a control",
        ),
        (
            'partition = "gpu"\naccount = "a\\rb"',
            "Error: --account 'a\\rb' contains a control character (\\r)",
        ),
        ('partition = "gpu"\nqos = ""', "Error: --qos must not be empty"),
        ("partition = 5", "Error: --partition must be text (got 5)"),
        (
            'partition = "gpu"\nslurm_opt = ["comment=a\\n#SBATCH --uid=0"]',
            "Error: --slurm-opt 'comment=a\\n#SBATCH",
        ),
        ('partition = "gpu"\nslurm_opt = [1]', "Error: --slurm-opt must be KEY=VALUE (got 1)"),
        ('partition = "gpu"\nsetup = ["echo hi\\nrm -rf /"]', "Error: --setup 'echo hi\\nrm -rf /' contains"),
        ('partition = "gpu"\nsetup = ["ok", 2]', "Error: --setup must be a line of shell (got 2)"),
        ('partition = "gpu"\nexclusive = "yes"', "Error: --exclusive must be true or false (got 'yes')"),
    ],
)
def test_sweep_file_slurm_table_is_checked_the_same(tmp_path, slurm_table, needle):
    toml = tmp_path / "sweep.toml"
    toml.write_text(f"lr = [0.01, 0.1]\n[slurm]\n{slurm_table}\n")
    line = refused(["sweep", "--config", str(toml), "--dry-run"], tmp_path / "results")
    assert line.startswith(needle), line


def test_valid_values_still_reach_the_script(tmp_path):
    args = [
        *DRY,
        *("--account", "proj-1", "--qos", "normal", "--constraint", "a100&ib"),
        *("--slurm-opt", "comment=two words", "--slurm-opt", "mail-type=END", "--setup", "module load cuda"),
    ]
    res = runner.invoke(app, [*args, "--results-dir", str(tmp_path / "results")])
    assert res.exit_code == 0, res.output
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj-1",
        "#SBATCH --qos=normal",
        "#SBATCH --constraint='a100&ib'",  # submitit shell-quotes #SBATCH values
        "#SBATCH --comment='two words'",
        "#SBATCH --mail-type=END",
        "module load cuda",
    ):
        assert line in res.output.splitlines(), (line, res.output)
    assert files_under(tmp_path / "results") == []


@pytest.mark.parametrize("option", ["--results-dir", "--name"])
def test_control_characters_in_paths_and_names_never_reach_the_script(tmp_path, option):
    """The sweep folder (--output/--error) and the name (--job-name) are in the sbatch script too."""
    bad = f"{tmp_path}/x\n#SBATCH --uid=0" if option == "--results-dir" else "x\n#SBATCH --uid=0"
    args = ["sweep", "--lr", "0.01", "--partition", "gpu", "--dry-run", option, bad]
    if option == "--name":
        args += ["--results-dir", str(tmp_path / "r")]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "control character" in lines[0], lines
    assert not any(ln.startswith("#SBATCH") for ln in res.output.splitlines())
    assert not list(tmp_path.iterdir())
