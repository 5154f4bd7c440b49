"""Bad input, systematically: hypothesis throws random text, numbers and comma lists at every option of
`train`, `sweep` and `report`. Whatever comes in, the command exits 0 or 2, never shows a traceback,
and a rejected command (exit 2) leaves no file in the results folder.

Nothing trains for long: training options get `--iters 1 --eval-every 1` beside them, options that
could start something big (`--iters`, `--epochs`, SLURM and DDP options, `--executor`) run as
`--dry-run`, and sweeps run in-process (`--executor debug`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mnist_jobs.cli import app

runner = CliRunner()


def fuzz(examples: int):
    """hypothesis settings: `examples` random inputs (MNIST_JOBS_FUZZ_EXAMPLES overrides, to dig deeper)."""
    n = int(os.environ.get("MNIST_JOBS_FUZZ_EXAMPLES", examples))
    return settings(
        max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
    )


# What argv can really hold: any text but NUL (a C string ends there) and lone surrogates.
TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=24)
NUMBER_TEXT = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.integers(min_value=-3, max_value=5).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "1e-400", "0x10", "1_000", " 3 ", "", "-0", "٣", "2.5"]),
)
EDGES = [str(2**31), str(2**63), str(2**64), "1e30", "1e31", "3.5e38", "1" * 40, "-" + "9" * 30, "1e18"]
LISTS = st.lists(st.one_of(NUMBER_TEXT, TEXT), min_size=0, max_size=3).map(",".join)
VALUE = st.one_of(TEXT, NUMBER_TEXT, LISTS, st.sampled_from(EDGES))

TRAINING = {  # option -> plausible values mixed into the random ones
    "--model": ["logreg", "cnn", "LogReg", "logreg,cnn", "mlp"],
    "--optimizer": ["sgd", "adam", "Adam", "rmsprop"],
    "--lr": ["0.1", "0.01,0.1", "-1", "0"],
    "--momentum": ["0.9", "-0.5"],
    "--weight-decay": ["0.0001", "-1"],
    "--schedule": ["constant", "cosine", "onecycle", "Cosine", "constant,onecycle", "linear"],
    "--warmup": ["0", "0.1", "0.3,0.5", "1", "-0.1", "0.999999"],
    "--normalize": ["on", "off", "on,off", "True", "maybe", "2"],
    "--deskew": ["on", "off", "on,off", "yes", "slanted", "-1"],
    "--batch-size": ["32", "0", "64,128", "60000", "100000"],
    "--epochs": ["1", "0"],
    "--iters": ["5", "0", "1.0", "1.5"],
    "--seed": ["0", "1,2", "-1", str(2**64)],
    "--eval-every": ["1", "0", "1000000"],
    "--device": ["cpu", "cuda", "cuda:0", "mps", "tpu", "auto"],
    "--data-dir": ["nowhere"],
    "--checkpoint-every": ["0", "1", "-1", "1e3"],
    "--max-requeues": ["0", "2", "-1"],
}
SLURM = {
    "--executor": ["auto", "slurm", "local", "debug", "pbs"],
    "--partition": ["gpu", "cpu", "gpu,cpu", ""],
    "--nodes": ["1", "2", "0"],
    "--gpus-per-node": ["0", "1", "3"],
    "--tasks-per-node": ["1", "2", "0"],
    "--cpus-per-task": ["1", "0", "64"],
    "--mem-gb": ["1", "0.5", "0", "-1", "nan"],
    "--time-min": ["1", "0", "60"],
    "--account": ["acct"],
    "--qos": ["normal"],
    "--constraint": ["a100"],
    "--slurm-opt": ["mail-type=END", "=x", "bad key=1", "x"],
    "--setup": ["module load cuda"],
    "--exclusive": ["yes"],  # a flag: a value after it is an extra argument
}
SWEEP_ONLY = {
    "--name": ["s", ".hidden", "a/b", "..", "x" * 300],
    "--max-parallel": ["1", "0", str(10**18)],
    "--pack": ["1", "2", "0", "-1"],
    "--config": ["<toml>"],
    "--dry-run": ["x"],
    "--wait": ["x"],
    "--retry-failed": ["x"],
    "--force": ["x"],
    "--yes": ["x"],
    "--samples": ["1", "3", "0", "-2", str(10**6)],
    "--search-seed": ["0", "7", "-1", str(2**64)],
}
# These could start something long or remote: only ever as a dry run.
DRY = {"--iters", "--epochs", "--batch-size", "--samples", *SLURM}
TOML_KEYS = ["name", "model", "lr", "seed", "iters", "batch_size", "device", "slurm", "bogus"]
TOML_KEYS += ["schedule", "warmup", "normalize", "deskew"]
TOML_VALUES = st.one_of(
    st.integers(min_value=-5, max_value=5).map(str),
    TEXT.map(json.dumps),
    st.lists(st.integers(min_value=-2, max_value=3), max_size=3).map(str),
    st.sampled_from(['"cpu"', "[0.1, 0.01]", "[]", "{partition = 'gpu'}", "[1, 'a']", "true", "1e999"]),
)
TOML = st.one_of(
    TEXT,
    st.lists(st.tuples(st.sampled_from(TOML_KEYS), TOML_VALUES), max_size=4).map(
        lambda kv: "".join(f"{k} = {v}\n" for k, v in kv)
    ),
)


@pytest.fixture(autouse=True, scope="module")
def no_scontrol():
    """Dry runs read MaxArraySize with `scontrol show config`, which waits ~9 s per call when a
    slurm.conf exists but no controller runs (the test cluster between sessions): answer for it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("mnist_jobs.slurm.max_array_size", lambda: 5)
        yield


def option_value(table: dict[str, list[str]]):
    return st.sampled_from(sorted(table)).flatmap(
        lambda opt: st.tuples(st.just(opt), st.one_of(st.sampled_from(table[opt]), VALUE))
    )


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def check(args: list[str], results: Path) -> None:
    res = runner.invoke(app, args)
    out = res.output
    assert "Traceback" not in out, (args, out)
    assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception), out)
    assert res.exit_code in (0, 2), (args, res.exit_code, out)
    if res.exit_code == 2:
        assert files_under(results) == [], (args, out, files_under(results))
        assert "Error" in out or "Usage" in out, (args, out)


def base_training(fuzzed: str) -> list[str]:
    fast = {"--iters": "1", "--eval-every": "1", "--device": "cpu"}
    if fuzzed == "--epochs":
        fast.pop("--iters")
    return [x for k, v in fast.items() if k != fuzzed for x in (k, v)]


def safe_path(root: Path, text: str) -> str:
    """Random text as a file name inside root (no escaping through '/' or '..')."""
    return str(root / ("p_" + text.replace("/", "_")))


def materialise(option: str, value: str, tmp: Path, toml: str) -> str:
    if option == "--data-dir":
        return safe_path(tmp / "data", value)
    if option == "--config":
        path = tmp / "sweep.toml"
        path.write_text(toml)
        return str(path) if value == "<toml>" else safe_path(tmp, value)
    return value


@fuzz(60)
@given(ov=option_value({**TRAINING, **SLURM}), toml=TOML)
def test_fuzz_train_options(ov, toml):
    option, value = ov
    with tempfile.TemporaryDirectory() as d:
        tmp, results = Path(d), Path(d) / "results"
        args = ["train", *base_training(option), option, materialise(option, value, tmp, toml)]
        if option in DRY:  # validated exactly as for real; a valid one is only printed
            args += ["--executor", "slurm", "--dry-run"] if option != "--executor" else ["--dry-run"]
        check([*args, "--results-dir", str(results)], results)


@fuzz(45)
@given(ov=option_value({**TRAINING, **SLURM, **SWEEP_ONLY}), toml=TOML)
def test_fuzz_sweep_options(ov, toml):
    option, value = ov
    with tempfile.TemporaryDirectory() as d:
        tmp, results = Path(d), Path(d) / "results"
        args = ["sweep", *base_training(option), option, materialise(option, value, tmp, toml)]
        if option == "--config" and value == "<toml>":
            args = ["sweep", option, str(tmp / "sweep.toml"), "--dry-run"]  # the file's grid, printed
        elif option in DRY:
            args += ["--dry-run"]
        else:
            args += ["--executor", "debug"]  # in-process: a valid grid of 1-iteration runs is quick
        check([*args, "--results-dir", str(results)], results)


@pytest.fixture(scope="module")
def report_results(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report-results")
    for lr in ("0.05,0.1",):
        res = runner.invoke(
            app,
            [
                *("sweep", "--lr", lr, "--seed", "0,1", "--iters", "2", "--eval-every", "1"),
                *("--device", "cpu", "--executor", "debug", "--name", "s", "--results-dir", str(folder)),
            ],
        )
        assert res.exit_code == 0, res.output
    return folder


REPORT = {
    "--sort": ["test_accuracy", "lr", "train_s", "nope", ""],
    "--top": ["1", "0", "-1", str(10**30)],
    "--group-by": ["lr", "lr,seed", "nope", ",", ""],
    "--no-group": ["x"],
    "--filter": ["lr=0.1", "lr>=1e-2", "lr!=0.1,0.05", "seed<1", "lr", "=1", "nope=1", "lr=abc", "lr<"],
    "--format": ["table", "csv", "json", "markdown", "md", "xml"],
    "--plot": ["plot.png", "plot.svg", "x"],
    "--all": ["x"],
    "--strict": ["x"],
    "PATH": ["missing", "s", "s/sweep.json"],
}


@fuzz(80)
@given(ovs=st.lists(option_value(REPORT), min_size=1, max_size=3))
def test_fuzz_report_options(report_results, ovs):
    before = files_under(report_results)
    with tempfile.TemporaryDirectory() as d:
        args, path = ["report"], str(report_results)
        for option, value in ovs:
            if option == "PATH":  # inside the results folder, or a missing path
                path = str(report_results / value.replace("/", "_")) if value else path
            elif option == "--plot":
                args += [option, safe_path(Path(d), value)]
            else:
                args += [option, value]
        res = runner.invoke(app, [*args, path])
        out = res.output
        assert "Traceback" not in out, (args, out)
        assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception))
        assert res.exit_code in (0, 2), (args, res.exit_code, out)
    assert files_under(report_results) == before  # report never writes into the results


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [  # what the fuzzing found (each was a traceback or exit 1 before)
        (["train", "--seed", str(2**64)], 2, "--seed must be <= 18446744073709551615"),
        (["train", "--batch-size", str(10**20)], 2, "--batch-size must be <= 60000"),
        (["train", "--weight-decay", "1e39"], 2, "--weight-decay must be <= 1e+30"),
        (["train", "--lr", "1e31", "--optimizer", "adam"], 2, "--lr must be <= 1e+30"),
        (["sweep", "--name", "x" * 300, "--executor", "debug"], 2, "--name must be at most 200 bytes"),
        (["sweep", "--max-parallel", str(10**18), "--executor", "debug"], 0, "1 task(s) completed"),
    ],
)
def test_fuzz_findings(tmp_path, args, code, needle):
    res = runner.invoke(app, [*args, "--iters", "1", "--eval-every", "1", "--results-dir", str(tmp_path)])
    assert res.exit_code == code and needle in res.output, res.output
    assert "Traceback" not in res.output


def test_fuzz_finding_plot_suffix(report_results, tmp_path):
    res = runner.invoke(app, ["report", str(report_results), "--plot", str(tmp_path / "p.0")])
    assert res.exit_code == 2 and "--plot" in res.output and "not supported" in res.output, res.output
