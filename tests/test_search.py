"""Random search (`--lr loguniform:1e-4:1e-1 --samples 20 --search-seed 0`): reproducible points,
crossed with the listed values, ordinary runs (config-hash ids, resume), the same from a TOML file, and
bad specs refused in one line."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mnist_jobs.cli import app
from mnist_jobs.config import ConfigError, TrainConfig
from mnist_jobs.grid import Distribution, expand_grid, read_sweep_file, sweep_run_id, sweep_space
from mnist_jobs.sweepdir import read_manifest

runner = CliRunner()
FAST = ["--iters", "20", "--eval-every", "10", "--device", "cpu"]
SEARCH = {"lr": "loguniform:1e-4:1e-1", "momentum": "uniform:0:0.99"}


def refused(args: list[str], results) -> str:
    """One line `Error: ...`, exit 2, no traceback, nothing written (as tests/test_bad_input.py)."""
    res = runner.invoke(app, [*args, "--results-dir", str(results)])
    assert res.exit_code == 2, (args, res.exit_code, res.output)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), (args, res.output)
    assert not results.exists() or not any(results.rglob("*")), list(results.rglob("*"))
    return lines[0]


def points(cli: dict, **kw) -> list[dict]:
    _, search = sweep_space(cli, **kw)
    return search.points()


def test_points_are_reproducible_rounded_and_in_range():
    a = points(SEARCH, samples=50, search_seed=0)
    assert a == points(SEARCH, samples=50, search_seed=0)  # the same command, the same points
    assert a != points(SEARCH, samples=50, search_seed=1)
    assert len({p["lr"] for p in a}) >= 49  # 3 significant digits: a repeated lr is possible
    lr_only = points({"lr": SEARCH["lr"]}, samples=200, search_seed=0)
    assert len({p["lr"] for p in lr_only}) == 200  # but never a repeated point: N samples, N runs
    for p in a:
        assert 1e-4 <= p["lr"] <= 0.1 and 0 <= p["momentum"] <= 0.99
        assert float(f"{p['lr']:.3g}") == p["lr"]  # 3 significant digits of the value
        assert round(p["momentum"], 3) == p["momentum"]  # 3 significant digits of the width 0.99
    # log-uniform: about as many draws per decade
    decades = [math.floor(math.log10(p["lr"])) for p in points(SEARCH, samples=3000, search_seed=0)]
    counts = [decades.count(d) for d in (-4, -3, -2)]
    assert all(800 < c < 1200 for c in counts), counts


def test_each_option_has_its_own_stream_and_more_samples_extend_the_same_points():
    both = points(SEARCH, samples=20, search_seed=3)
    lr_only = points({"lr": SEARCH["lr"]}, samples=20, search_seed=3)
    assert [p["lr"] for p in both] == [p["lr"] for p in lr_only]  # adding --momentum keeps the lrs
    tiny = points({"batch_size": "uniform:32:34"}, samples=5, search_seed=0)
    assert sorted(p["batch_size"] for p in tiny) == [32, 33, 34]  # all the space has, no endless loop
    assert points(SEARCH, samples=30, search_seed=3)[:20] == both  # --samples 30 resumes --samples 20


def test_integer_options_draw_integers_with_both_ends():
    d = Distribution(name="batch_size", kind="uniform", low=32, high=35)
    values = d.values(400, seed=0)
    assert set(values) == {32, 33, 34, 35} and all(type(v) is int for v in values)
    logd = Distribution(name="batch_size", kind="loguniform", low=16, high=512).values(400, seed=0)
    assert min(logd) >= 16 and max(logd) <= 512 and all(type(v) is int for v in logd)
    assert sum(v < 91 for v in logd) > 150  # half the log range is below sqrt(16 * 512) = 90.5


def test_sampled_points_are_crossed_with_the_listed_values():
    values, search = sweep_space({**SEARCH, "seed": "0,1,2"}, samples=4, search_seed=0)
    configs = expand_grid(values, search)
    assert len(configs) == 12
    sampled = {(c.lr, c.momentum) for c in configs}
    assert sampled == {(p["lr"], p["momentum"]) for p in search.points()}
    for lr, m in sampled:  # every point with every seed
        assert sorted(c.seed for c in configs if (c.lr, c.momentum) == (lr, m)) == [0, 1, 2]


def test_toml_file_gives_the_same_points_and_the_cli_overrides_it(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(
        'lr = "loguniform:1e-4:1e-1"\nmomentum = "uniform:0:0.99"\nseed = [0, 1]\n'
        "samples = 5\nsearch-seed = 7\n"
    )
    from_file = expand_grid(*sweep_space({}, read_sweep_file(f)))
    from_cli = expand_grid(*sweep_space({**SEARCH, "seed": "0,1"}, samples=5, search_seed=7))
    assert [sweep_run_id(c) for c in from_file] == [sweep_run_id(c) for c in from_cli]
    more = expand_grid(*sweep_space({}, read_sweep_file(f), samples=6))
    assert len(more) == 12
    listed = expand_grid(*sweep_space({"lr": "0.01"}, read_sweep_file(f)))  # --lr 0.01 over the file's
    assert {c.lr for c in listed} == {0.01} and len({c.momentum for c in listed}) == 5


def _dry(tmp_path, *extra: str) -> str:
    res = runner.invoke(
        app,
        ["sweep", "--lr", "loguniform:1e-4:1e-1", "--momentum", "uniform:0:0.99", "--samples", "3",
         "--seed", "0,1", "--device", "cpu", "--dry-run", "--results-dir", str(tmp_path), *extra],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return res.output


def test_dry_run_shows_the_sampled_runs_and_writes_nothing(tmp_path):
    out = _dry(tmp_path)
    assert "6 run(s)" in out
    assert (
        "random search: 3 point(s) drawn with search seed 0, each crossed with 2 listed combination(s):"
        in out
    )
    assert "\n  --lr loguniform:0.0001:0.1\n  --momentum uniform:0:0.99\n" in out
    for p in points(SEARCH, samples=3, search_seed=0):
        assert out.count(f" {p['lr']} ") == 2 and out.count(f" {p['momentum']} ") >= 2  # once per seed
    assert out == _dry(tmp_path)  # the same command: the same runs, the same sweep name
    assert _dry(tmp_path, "--search-seed", "1") != out
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_search_runs_as_ordinary_runs_and_resumes(tmp_path):
    args = ["sweep", "--lr", "loguniform:0.01:0.5", "--samples", "2", "--seed", "0,1", *FAST,
            "--executor", "debug", "--name", "rs", "--results-dir", str(tmp_path)]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    manifest = read_manifest(tmp_path / "rs")
    assert len(manifest["runs"]) == 4
    assert manifest["grid"]["lr"] == {"distribution": "loguniform:0.01:0.5", "samples": 2, "search_seed": 0}
    assert manifest["grid"]["seed"] == [0, 1]
    lrs = [p["lr"] for p in points({"lr": "loguniform:0.01:0.5"}, samples=2, search_seed=0)]
    for run_id in manifest["runs"]:
        rec = json.loads((tmp_path / "rs" / f"{run_id}.json").read_text())
        assert rec["status"] == "completed" and rec["config"]["lr"] in lrs
        assert run_id == sweep_run_id(TrainConfig.from_dict(rec["config"]))
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "4 run(s) already completed: skipped" in again.output
    more = runner.invoke(app, [*args, "--samples", "3"])  # the first 2 points again, then a third
    assert more.exit_code == 0, more.output
    assert "4 run(s) already completed: skipped" in more.output and "running 2 run(s)" in more.output


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (
            ["--lr", "uniform:1:0", "--samples", "3"],
            "--lr 'uniform:1:0': LOW must be below HIGH (got 1.0 and 0.0)",
        ),
        (["--lr", "loguniform:0:1", "--samples", "3"], "--lr 'loguniform:0:1': loguniform needs LOW > 0"),
        (["--lr", "uniform:0:1", "--samples", "3"], "--lr 'uniform:0:1': --lr must be > 0 (got 0.0)"),
        (["--momentum", "uniform:0:1", "--samples", "3"], "--momentum must be >= 0 and < 1 (got 1.0)"),
        (["--lr", "uniform:0.1", "--samples", "3"], "a distribution is uniform:LOW:HIGH"),
        (["--lr", "uniform:a:1", "--samples", "3"], "LOW and HIGH must be numbers"),
        (["--lr", "uniform:nan:1", "--samples", "3"], "LOW and HIGH must be finite (got nan)"),
        (
            ["--lr", "normal:0:1", "--samples", "3"],
            "unknown distribution 'normal' (valid: uniform, loguniform)",
        ),
        (
            ["--lr", "0.1,uniform:0.1:1", "--samples", "3"],
            "a distribution is the whole value, not part of a list",
        ),
        (["--lr", "loguniform:1e-4:1e-1", "--samples", "0"], "--samples must be >= 1"),
        (["--lr", "loguniform:1e-4:1e-1", "--samples", "-2"], "--samples must be >= 1"),
        (
            ["--lr", "loguniform:1e-4:1e-1"],
            "--lr loguniform:0.0001:0.1 is sampled: say how many points, --samples N",
        ),
        (["--lr", "0.1", "--samples", "3"], "--samples needs a sampled option"),
        (["--lr", "0.1", "--search-seed", "3"], "--search-seed needs a sampled option"),
        (
            ["--lr", "loguniform:1e-4:1e-1", "--samples", "3", "--search-seed", "-1"],
            "--search-seed must be >= 0",
        ),
        (["--lr", "loguniform:1e-4:1e-1", "--samples", "1000000"], "--samples must be >= 1 and <= 100000"),
        (
            ["--seed", "uniform:0:10", "--samples", "3"],
            "--seed cannot be sampled (seeds are listed, not drawn",
        ),
        (["--eval-every", "uniform:1:10", "--samples", "3"], "--eval-every cannot be sampled"),
        (
            ["--model", "uniform:0:1", "--samples", "3"],
            "--model takes a name or a comma list of names, not a distribution",
        ),
        (
            ["--batch-size", "uniform:1.5:64", "--samples", "3"],
            "--batch-size is an integer, so LOW and HIGH must be",
        ),
        (["--batch-size", "uniform:32:100000", "--samples", "3"], "--batch-size must be <= 60000"),
        (
            ["--lr", "loguniform:1e-4:1e-1", "--samples", "200", "--seed", ",".join(map(str, range(51)))],
            "the grid has 10,200 runs",
        ),
        (
            ["--epochs", "uniform:1:3", "--iters", "100", "--samples", "2"],
            "give --epochs or --iters, not both",
        ),
        (["--samples", "x"], "Invalid value for '--samples'"),
        (["--warmup", "uniform:0:1", "--samples", "2"], "--warmup is a fraction of the iterations"),
        (["--warmup", "loguniform:0:0.3", "--samples", "2"], "loguniform needs LOW > 0"),
    ],
)
def test_bad_search_specs_are_one_line_exit_2(tmp_path, extra, needle):
    line = refused(["sweep", *extra, "--device", "cpu", "--dry-run"], tmp_path / "results")
    assert needle in line, line


def test_bad_search_in_a_toml_file_is_one_line_too(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('lr = ["loguniform:1e-4:1e-1"]\nsamples = 3\n')
    assert "a distribution is the whole value" in refused(["sweep", "--config", str(f)], tmp_path / "r")
    f.write_text('lr = "loguniform:1e-4:1e-1"\nsamples = "3"\n')
    assert "--samples must be an integer (got '3')" in refused(["sweep", "--config", str(f)], tmp_path / "r")
    f.write_text('lr = "loguniform:1e-4:1e-1"\nsamples = 3\nsearch_seeds = 1\n')
    assert "unknown key(s) 'search_seeds'" in refused(["sweep", "--config", str(f)], tmp_path / "r")


def test_grid_values_refuses_a_search():
    from mnist_jobs.grid import grid_values

    with pytest.raises(ConfigError, match="a random search, not a grid"):
        grid_values({"lr": "uniform:0.1:1"}, {"samples": 2})


NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.sampled_from(["0", "1", "0.99", "1e-4", "1e309", "5e-324", "", " 2 ", "x", "1:2"]),
)
SPECS = st.tuples(
    st.sampled_from(["uniform", "loguniform", "LogUniform", "normal", ""]), NUMBERS, NUMBERS
).map(":".join)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(
    option=st.sampled_from(
        ["--lr", "--momentum", "--weight-decay", "--batch-size", "--iters", "--seed", "--model"]
    ),
    spec=st.one_of(SPECS, st.text(max_size=12)),
    samples=st.one_of(st.none(), st.integers(min_value=-3, max_value=12), st.just(10**30)),
    search_seed=st.one_of(st.none(), st.integers(min_value=-(2**70), max_value=2**70)),
)
def test_fuzz_search_specs(option, spec, samples, search_seed):
    """Whatever the spec, a dry run exits 0 (and lists the runs) or 2 with one line, no traceback."""
    args = ["sweep", option, spec, "--device", "cpu", "--dry-run", "--results-dir", "/nonexistent/r"]
    if samples is not None:
        args += ["--samples", str(samples)]
    if search_seed is not None:
        args += ["--search-seed", str(search_seed)]
    res = runner.invoke(app, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception))
    assert "Traceback" not in res.output and res.exit_code in (0, 2), (args, res.exit_code, res.output)
    if res.exit_code == 2:
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args, res.output)
    else:
        assert "dry run: nothing submitted" in res.output


def test_warmup_is_sampled_in_its_range():
    got = [p["warmup"] for p in points({"warmup": "uniform:0:0.3", "schedule": "cosine"}, samples=20)]
    assert len(set(got)) > 10 and all(0 <= w <= 0.3 for w in got)


def test_train_given_a_distribution_points_to_the_random_search(tmp_path):
    line = refused(["train", "--lr", "loguniform:1e-4:1e-2", *FAST], tmp_path / "results")
    assert (
        "a distribution is for a random search: mnist-jobs sweep --lr loguniform:1e-4:1e-2 --samples N"
        in line
    )


def test_more_samples_without_a_name_go_to_the_same_sweep_and_train_only_the_new_points(tmp_path):
    """A random search's default folder is named after what it draws from, not how many points: the
    same search with --samples 3 after --samples 2 finds the 2 completed runs and trains 1; another
    search seed (other points) is another sweep."""
    args = ["sweep", "--lr", "loguniform:0.01:0.1", "--iters", "20", "--eval-every", "10", "--device", "cpu",
            "--results-dir", str(tmp_path)]  # fmt: skip
    first = CliRunner().invoke(app, [*args, "--samples", "2"])
    assert first.exit_code == 0, first.output
    more = CliRunner().invoke(app, [*args, "--samples", "3"])
    assert more.exit_code == 0, more.output
    assert "2 run(s) already completed: skipped" in more.output and "running 1 run(s) here" in more.output
    [folder] = [p.parent for p in tmp_path.glob("*/sweep.json")]
    assert len(read_manifest(folder)["runs"]) == 3
    other = CliRunner().invoke(app, [*args, "--samples", "2", "--search-seed", "1", "--dry-run"])
    assert folder.name not in other.output.splitlines()[0], other.output
