"""`mnist-jobs report`: real results from short real training runs, plus hand-made broken files."""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import statistics
import subprocess
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mnist_jobs import report as rep
from mnist_jobs.cli import app
from mnist_jobs.config import TrainConfig

LRS = (0.01, 0.1)
SEEDS = (0, 1, 2)
runner = CliRunner(env={"COLUMNS": "200"})


def run_id(lr: float, seed: int) -> str:
    return f"lr{lr:g}-s{seed}"


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results/lr-study: 2 lrs x 3 seeds of real 30-iteration runs (data decoded once for all six)."""
    from mnist_jobs import data as mnist_data
    from mnist_jobs.train import train

    root = tmp_path_factory.mktemp("results") / "lr-study"
    root.mkdir()
    real_load, cache = mnist_data.load, {}

    def cached_load(data_dir=None, *, device="cpu", **options):
        key = (str(data_dir), str(device), tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = real_load(data_dir, device=device, **options)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mnist_data, "load", cached_load)
        for lr in LRS:
            for seed in SEEDS:
                cfg = TrainConfig(iters=30, eval_every=10, device="cpu", lr=lr, seed=seed)
                train(cfg, results_dir=root, run_id=run_id(lr, seed), progress=lambda p: None)
    return root


@pytest.fixture(scope="session")
def results(sweep_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sweep_dir.glob("*.json")}


@pytest.fixture
def folder(sweep_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the sweep that a test may add files to."""
    return Path(shutil.copytree(sweep_dir, tmp_path / "lr-study"))


def accs(results: dict[str, dict], lr: float) -> list[float]:
    return [results[run_id(lr, s)]["metrics"]["test_accuracy"] for s in SEEDS]


def render(table, width: int = 200) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width).print(table)
    return buf.getvalue()


def write_result(folder: Path, template: dict, rid: str, **changes) -> dict:
    data = json.loads(json.dumps(template))
    data["run_id"] = rid
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    (folder / f"{rid}.json").write_text(json.dumps(data))
    return data


def write_manifest(folder: Path, runs: dict[str, dict]) -> None:
    manifest = {"kind": "mnist-jobs/sweep", "schema_version": 1, "name": folder.name, "executor": "slurm"}
    manifest["grid"] = {"lr": list(LRS)}
    manifest["runs"] = runs
    (folder / "sweep.json").write_text(json.dumps(manifest))


def cli(*args: str):
    return runner.invoke(app, ["report", *map(str, args)])


# ---- the table -----------------------------------------------------------------------------------


def test_lr_by_seed_sweep_gives_one_row_per_lr_with_mean_std_and_n(sweep_dir, results):
    report = rep.make_report(sweep_dir)
    assert [r["lr"] for r in report.rows] == list(LRS)
    assert report.columns == ["lr"]  # only what varies (seed is averaged over)
    assert report.grouped_over == ["seed"]
    assert report.constants["model"] == "logreg" and "epochs" not in report.constants
    text = render(rep.build_table(report))
    for lr, row in zip(LRS, report.rows):
        a = accs(results, lr)
        assert row["n"] == len(SEEDS)
        assert row["test_accuracy_mean"] == pytest.approx(statistics.mean(a))
        assert row["test_accuracy_std"] == pytest.approx(statistics.stdev(a))
        assert f"{statistics.mean(a):.2f} ± {statistics.stdev(a):.2f}" in text
        losses = [results[run_id(lr, s)]["metrics"]["test_loss"] for s in SEEDS]
        assert f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}" in text
    words = " ".join(text.split())  # the caption wraps at the table's width
    assert "same for all: model=logreg optimizer=sgd" in words
    assert "iters=30 eval_every=10 device=cpu world_size=1" in words  # constants: caption, not columns
    assert "mean ± std over seed" in text
    assert "6 completed" in text
    header = next(line for line in text.splitlines() if "test acc %" in line)
    for name in ("seed", "momentum", "epochs", "device", "world", "status"):
        assert name not in header


def test_best_row_is_highlighted(sweep_dir, results):
    report = rep.make_report(sweep_dir)
    best_lr = max(LRS, key=lambda lr: statistics.mean(accs(results, lr)))
    assert report.rows[report.best]["lr"] == best_lr
    table = rep.build_table(report)
    styles = [row.style for row in table.rows]
    assert styles[report.best] == "bold green"
    assert sum(s is not None for s in styles) == 1


def test_no_group_lists_every_run_and_group_by_seed_averages_over_lr(sweep_dir, results):
    one_each = rep.make_report(sweep_dir, group=False)
    assert len(one_each.rows) == 6 and one_each.columns == ["lr", "seed"]
    assert {r["run_ids"][0] for r in one_each.rows} == set(results)

    by_seed = rep.make_report(sweep_dir, group_by="seed")
    assert [r["seed"] for r in by_seed.rows] == list(SEEDS)
    assert by_seed.grouped_over == ["lr"]
    for row in by_seed.rows:
        a = [results[run_id(lr, row["seed"])]["metrics"]["test_accuracy"] for lr in LRS]
        assert row["n"] == 2 and row["test_accuracy_mean"] == pytest.approx(statistics.mean(a))


def test_sort_top_and_filter(sweep_dir, results):
    by_acc = sorted(results.values(), key=lambda d: -d["metrics"]["test_accuracy"])
    top = rep.make_report(sweep_dir, group=False, sort="test_accuracy", top=2)
    assert [r["run_ids"][0] for r in top.rows] == [d["run_id"] for d in by_acc[:2]]
    assert top.total_rows == 6
    assert "top 2 of 6 rows" in render(rep.build_table(top))
    # --top without --sort: best first
    assert rep.make_report(sweep_dir, top=1).rows[0]["lr"] == max(
        LRS, key=lambda x: statistics.mean(accs(results, x))
    )
    by_loss = rep.make_report(sweep_dir, group=False, sort="metrics.test_loss")
    losses = [r["test_loss_mean"] for r in by_loss.rows]
    assert losses == sorted(losses)  # loss: ascending
    # typed filters: 1e-2 is the float 0.01; several filters must all hold
    only = rep.make_report(sweep_dir, group=False, filters=["lr=1e-2", "seed!=0"])
    assert sorted(r["run_ids"][0] for r in only.rows) == [run_id(0.01, 1), run_id(0.01, 2)]
    assert only.counts["completed"] == 2
    assert rep.make_report(sweep_dir, filters=["model=CNN"]).rows == []
    threshold = statistics.median(d["metrics"]["test_accuracy"] for d in results.values())
    above = rep.make_report(sweep_dir, group=False, filters=[f"test_accuracy>{threshold}"])
    assert all(r["test_accuracy_mean"] > threshold for r in above.rows) and 0 < len(above.rows) < 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sort": "nope"}, "unknown key 'nope'"),
        ({"filters": ["lr=abc"]}, "lr must be a number"),
        ({"filters": ["lr"]}, "KEY=VALUE"),
        ({"group_by": "test_accuracy"}, "--group-by takes config keys"),
        ({"group_by": "lr", "group": False}, "not both"),
    ],
)
def test_bad_options_raise_report_error(sweep_dir, kwargs, message):
    with pytest.raises(rep.ReportError, match=message):
        rep.make_report(sweep_dir, **kwargs)


# ---- machine formats -----------------------------------------------------------------------------


def test_csv_json_markdown_parse_and_contain_every_run(sweep_dir, results):
    out = {}
    for fmt in ("csv", "json", "markdown"):
        r = cli(sweep_dir, "--format", fmt)
        assert r.exit_code == 0, r.output
        assert "\x1b[" not in r.stdout and r.stderr == ""
        out[fmt] = r.stdout

    rows = list(csv.DictReader(io.StringIO(out["csv"])))
    assert list(rows[0]) == list(rep.ROW_COLUMNS)
    assert sorted(rid for row in rows for rid in row["run_ids"].split()) == sorted(results)
    doc = json.loads(out["json"])
    assert doc["columns"] == list(rep.ROW_COLUMNS) and doc["counts"]["completed"] == 6
    assert sorted(rid for row in doc["rows"] for rid in row["run_ids"]) == sorted(results)
    for lr, c, j in zip(LRS, rows, doc["rows"]):
        a = accs(results, lr)
        assert float(c["lr"]) == lr and j["lr"] == lr and int(c["n"]) == j["n"] == 3
        assert float(c["test_accuracy_mean"]) == pytest.approx(statistics.mean(a), abs=1e-6)
        assert j["test_accuracy_std"] == pytest.approx(statistics.stdev(a), abs=1e-6)
        assert c["seed"] == "" and j["seed"] is None  # averaged over

    table_lines = [line for line in out["markdown"].splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(LRS)  # header, rule, one per lr
    assert all(rid in out["markdown"] for rid in results)
    assert (
        f"{statistics.mean(accs(results, 0.1)):.2f} ± {statistics.stdev(accs(results, 0.1)):.2f}"
        in out["markdown"]
    )

    per_run = list(csv.DictReader(io.StringIO(cli(sweep_dir, "--no-group", "--format", "csv").stdout)))
    assert sorted(row["run_ids"] for row in per_run) == sorted(results)
    for row in per_run:
        assert float(row["test_accuracy_mean"]) == results[row["run_ids"]]["metrics"]["test_accuracy"]
        assert int(row["seed"]) == results[row["run_ids"]]["config"]["seed"]


def test_cli_table_and_options(sweep_dir, results):
    r = cli(sweep_dir, "--sort", "test_accuracy", "--top", "1")
    assert r.exit_code == 0, r.output
    best = max(LRS, key=lambda lr: statistics.mean(accs(results, lr)))
    a = accs(results, best)
    assert f"{statistics.mean(a):.2f} ± {statistics.stdev(a):.2f}" in r.stdout
    assert "top 1 of 2 rows" in r.stdout
    r = cli(sweep_dir, "--filter", "lr=0.1", "--filter", "seed=2", "--format", "json")
    assert [row["run_ids"] for row in json.loads(r.stdout)["rows"]] == [[run_id(0.1, 2)]]
    for args, message in [
        (("--sort", "bogus"), "unknown key 'bogus'"),
        (("--format", "xml"), "--format must be"),
        (("--top", "0"), "--top"),
        (("--group-by", "lr", "--no-group"), "not both"),
        (("--filter", "lr=fast"), "lr must be a number"),
    ]:
        r = cli(sweep_dir, *args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli(sweep_dir / "missing")
    assert r.exit_code == 2 and "does not exist" in r.stderr


# ---- robustness: bad files, unfinished runs ------------------------------------------------------


def test_broken_foreign_and_future_files_are_skipped_with_one_warning(tmp_path, results):
    good = results[run_id(0.1, 0)]
    (tmp_path / "good.json").write_text(json.dumps(good))
    text = json.dumps(good)
    (tmp_path / "truncated.json").write_text(text[: len(text) // 2])
    (tmp_path / "foreign.json").write_text(json.dumps({"name": "package.json", "version": "1.0"}))
    (tmp_path / "future.json").write_text(json.dumps({**good, "schema_version": 99, "run_id": "future"}))
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\x00\xff")
    (tmp_path / "weird.json").write_text(json.dumps({**good, "config": "lr=0.1", "run_id": "weird"}))
    (tmp_path / ".good.json.tmp.json").write_text("{")  # an atomic write in progress: ignored

    report = rep.make_report(tmp_path)
    assert [r["run_ids"] for r in report.rows] == [[good["run_id"]]]
    assert len(report.skipped) == 5

    r = cli(tmp_path)
    assert r.exit_code == 0, r.output
    assert good["run_id"] not in r.stdout  # grouped table: the numbers, not the id
    assert f"{good['metrics']['test_accuracy']:.2f}" in r.stdout and "1 completed" in r.stdout
    warning = r.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("Warning: skipped 5 unreadable or foreign JSON files")

    r = cli(tmp_path, "--strict")
    assert r.exit_code == 2 and r.stderr.startswith("Error: 5 unreadable or foreign JSON files")
    assert r.stdout == ""


def test_failed_running_and_pending_runs_are_counted_and_listed_with_all(folder, results):
    template = results[run_id(0.01, 0)]
    write_result(folder, template, "crashed", status="failed", metrics={}, error={"message": "CUDA OOM"})
    write_result(folder, template, "still-going", status="running", metrics={})
    entries = {rid: {"config": d["config"], "job_id": f"7_{i}"} for i, (rid, d) in enumerate(results.items())}
    entries["crashed"] = {"config": template["config"], "job_id": "7_6"}
    entries["queued"] = {"config": {**template["config"], "lr": 1.0}, "job_id": "7_7"}
    write_manifest(folder, entries)

    report = rep.make_report(folder)
    assert report.counts == {"completed": 6, "failed": 1, "running": 1, "pending": 1}
    assert len(report.rows) == 2 and report.other_rows == []
    text = render(rep.build_table(report))
    assert "6 completed · 1 failed · 1 running · 1 pending" in text and "--all lists" in text
    assert "queued" not in text

    listed = rep.make_report(folder, include_all=True)
    assert [r["status"] for r in listed.other_rows] == ["failed", "pending", "running"]
    assert [r["run_ids"] for r in listed.other_rows] == [["crashed"], ["queued"], ["still-going"]]
    text = render(rep.build_table(listed))
    assert "failed: CUDA OOM" in text and "pending (job 7_7)" in text
    header = next(line for line in text.splitlines() if "test acc %" in line)
    assert "status" in header and "device" not in header  # a pending run's device is not known yet
    assert listed.columns == ["lr"] and [r["lr"] for r in listed.other_rows] == [0.01, 1.0, 0.01]
    doc = json.loads(cli(folder, "--all", "--format", "json").stdout)
    assert sorted(rid for row in doc["rows"] for rid in row["run_ids"]) == sorted(
        [*results, "crashed", "queued", "still-going"]
    )


def test_device_is_where_it_ran_and_world_size_splits_rows(folder, results):
    template = results[run_id(0.1, 0)]
    # asked for "auto", ran on cpu: the same row as the cpu runs
    write_result(folder, template, "auto-cpu", config__device="auto", config__seed=7)
    report = rep.make_report(folder)
    assert [r["n"] for r in report.rows] == [3, 4] and {r["device"] for r in report.rows} == {"cpu"}
    # two ranks: its own row, world size 2
    write_result(folder, template, "ddp", distributed={"world_size": 2}, config__seed=8)
    report = rep.make_report(folder)
    assert sorted((r["lr"], r["world_size"], r["n"]) for r in report.rows) == [
        (0.01, 1, 3),
        (0.1, 1, 4),
        (0.1, 2, 1),
    ]
    header = next(line for line in render(rep.build_table(report)).splitlines() if "test acc %" in line)
    assert "world" in header and "device" not in header
    assert len(rep.make_report(folder, filters=["world_size=2"]).rows) == 1
    write_result(folder, template, "gpu", env={**template["env"], "device": "cuda:1"}, config__seed=9)
    on_gpu = rep.make_report(folder, filters=["device=cuda"], group=False)
    assert [r["run_ids"] for r in on_gpu.rows] == [["gpu"]] and on_gpu.rows[0]["device"] == "cuda:1"
    assert rep.make_report(folder, filters=["device!=cuda"]).counts["completed"] == 8


def test_empty_folder(tmp_path):
    r = cli(tmp_path)
    assert r.exit_code == 0 and "No results to show" in r.stdout and "0 completed" in r.stdout
    assert list(csv.reader(io.StringIO(cli(tmp_path, "--format", "csv").stdout))) == [list(rep.ROW_COLUMNS)]


# ---- plot ----------------------------------------------------------------------------------------


def test_plot_writes_a_png_of_the_sweep(sweep_dir, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    out = tmp_path / "plots" / "lr-study.png"
    r = cli(sweep_dir, "--plot", out)
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(out)
    height, width = image.shape[:2]
    assert width > 2 * height > 600  # two panels side by side: accuracy vs lr, accuracy curves
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert "0.01" in r.stdout  # the table is still printed


def test_plot_lr_axis_is_logarithmic_when_the_lrs_span_a_decade(sweep_dir, folder):
    pytest.importorskip("matplotlib")
    fig = rep.figure(rep.make_report(sweep_dir))  # lr 0.01 and 0.1: one decade
    lr_axis, curves = fig.axes[0], fig.axes[1]
    assert lr_axis.get_xlabel() == "lr" and lr_axis.get_xscale() == "log"
    assert curves.get_xlabel() == "iteration" and curves.get_xscale() == "linear"
    for seed in SEEDS:  # lr 0.01 and 0.05: less than a decade, a linear axis
        path = folder / f"{run_id(0.1, seed)}.json"
        data = json.loads(path.read_text())
        data["config"]["lr"] = 0.05
        path.write_text(json.dumps(data))
    lr_axis = rep.figure(rep.make_report(folder)).axes[0]
    assert lr_axis.get_xlabel() == "lr" and lr_axis.get_xscale() == "linear"
    assert rep.log_axis([0.001, 0.01]) and rep.log_axis([1e-4, 3e-4, 1e-3]) and rep.log_axis([0.3, 0.03])
    assert not rep.log_axis([0.01, 0.05]) and not rep.log_axis([0.0, 0.9]) and not rep.log_axis(["a", "b"])


def test_plot_without_matplotlib_says_how_to_get_it(sweep_dir, tmp_path, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    r = cli(sweep_dir, "--plot", tmp_path / "x.png")
    assert r.exit_code == 2
    assert "pip install 'mnist-jobs[plot]'" in r.stderr and not (tmp_path / "x.png").exists()


# ---- diverged runs -------------------------------------------------------------------------------


def test_diverged_runs_are_failed_runs_named_diverged_and_never_nan(folder, results):
    """A real pack in which one model diverges (lr 100 with weight decay 1), next to the sweep, plus a
    completed result that an older version wrote with NaN tokens: the table names the divergence and
    never shows nan."""
    from mnist_jobs.train import train_pack

    good = TrainConfig(iters=30, eval_every=10, device="cpu", lr=0.1, seed=5)
    bad = TrainConfig(iters=30, eval_every=10, device="cpu", lr=100.0, weight_decay=1.0, seed=5)
    train_pack([good, bad], results_dir=folder, run_ids=["ok", "diverged"], progress=lambda p: None)
    old = results[run_id(0.01, 0)]
    legacy = json.dumps({**old, "run_id": "legacy", "config": {**old["config"], "seed": 9}}).replace(
        '"test_loss": ', '"test_loss": NaN, "was": ', 1
    )
    (folder / "legacy.json").write_text(legacy)

    report = rep.make_report(folder)
    assert report.counts["failed"] == 1 and report.diverged == 1 and report.counts["completed"] == 8
    text = render(rep.build_table(report))
    assert "1 failed (1 diverged)" in text and "--all lists" in text
    assert "nan" not in text.lower()

    listed = rep.make_report(folder, include_all=True)
    [row] = listed.other_rows
    assert row["run_ids"] == ["diverged"] and row["test_accuracy_mean"] is None
    text = " ".join(render(rep.build_table(listed), width=300).split())
    assert (
        "failed: Diverged: train loss became NaN at iteration 20 (lr 100, weight decay 1); lower --lr" in text
    )
    assert "nan" not in text

    for fmt in ("csv", "json", "markdown"):
        r = cli(folder, "--all", "--format", fmt)
        assert r.exit_code == 0, r.output
        assert "Diverged: train loss became NaN" in r.stdout and "nan" not in r.stdout.lower().replace(
            "became nan", ""
        )
    doc = json.loads(cli(folder, "--all", "--format", "json").stdout, parse_constant=lambda c: 1 / 0)
    assert doc["diverged"] == 1 and doc["counts"]["failed"] == 1


# ---- where two sources meet: filters, copies, resubmissions --------------------------------------


def test_a_filter_that_matches_nothing_says_so_and_what_the_key_takes(sweep_dir):
    r = cli(sweep_dir, "--filter", "lr=0.5")
    assert r.exit_code == 0, r.output
    line = " ".join(r.stdout.split())
    assert line == f"No run under {sweep_dir} matches --filter lr=0.5 (6 runs; lr takes 0.01, 0.1)", line
    both = " ".join(cli(sweep_dir, "--filter", "lr=0.5", "--filter", "model=cnn").stdout.split())
    assert "--filter lr=0.5 --filter model=cnn (6 runs; lr takes 0.01, 0.1; model takes logreg)" in both
    as_csv = cli(sweep_dir, "--filter", "lr=0.5", "--format", "csv")  # data stays data: a header alone
    assert list(csv.reader(io.StringIO(as_csv.stdout))) == [list(rep.ROW_COLUMNS)]
    assert "Warning: no run under" in as_csv.output and "lr takes 0.01, 0.1" in as_csv.output
    assert rep.make_report(sweep_dir, filters=["lr=0.01"]).no_match is None  # (it matches)


def test_the_same_runs_in_two_folders_are_counted_once_the_newest_kept(tmp_path, sweep_dir, results):
    """A sweep folder copied beside itself (a backup, a teammate's copy): each row is still over 3
    seeds, not 6 with every seed twice; of two results of one run the newer counts."""
    root = tmp_path / "all"
    for name in ("mine", "copy"):
        shutil.copytree(sweep_dir, root / name)
    twice = rep.make_report(root)
    assert [r["n"] for r in twice.rows] == [3, 3] and twice.counts["completed"] == 6
    assert len(twice.duplicates) == 6 and "6 duplicates left out" in rep.footer(twice)
    newer = results[run_id(0.1, 0)]
    write_result(
        root / "copy", newer, run_id(0.1, 0), finished_at="9999-01-01T00:00:00Z", metrics__test_accuracy=99.9
    )
    [row] = [r for r in rep.make_report(root).rows if r["lr"] == 0.1]
    assert row["n"] == 3 and row["test_accuracy_mean"] == pytest.approx(
        statistics.mean([99.9, *accs(results, 0.1)[1:]])
    )
    once = rep.make_report(sweep_dir)
    assert once.duplicates == [] and "duplicate" not in rep.footer(once)


def test_a_failed_run_submitted_again_counts_as_running_or_pending_not_failed(folder, results):
    """`sweep --retry-failed` while it runs: the failed result is still on disk, but the run is being
    trained again (its claim is held) or waits for a slot in the local sweep that took it (that sweep
    process still runs): report counts it so. Once neither holds, the old result stands again."""
    from mnist_jobs.claims import claim_run
    from mnist_jobs.local import process_identity

    template = results[run_id(0.01, 0)]
    write_result(folder, template, "retried", status="failed", metrics={}, finished_at="2026-01-01T00:00:00Z",
                 error={"message": "CUDA OOM"}, config__seed=7)  # fmt: skip
    write_result(folder, template, "waiting", status="failed", metrics={}, finished_at="2026-01-01T00:00:00Z",
                 error={"message": "CUDA OOM"}, config__seed=8)  # fmt: skip
    entries = {rid: {"config": d["config"], "executor": "local"} for rid, d in results.items()}
    sweep = subprocess.Popen(["sleep", "60"])  # a sweep process of this machine, still running
    try:
        again = {"executor": "local", "submitted_at": "2026-02-01T00:00:00Z", "host": socket.gethostname(),
                 "sweep_process": process_identity(sweep.pid)}  # fmt: skip
        entries["retried"] = {"config": {**template["config"], "seed": 7}, **again}
        entries["waiting"] = {"config": {**template["config"], "seed": 8}, **again}
        write_manifest(folder, entries)
        with claim_run(folder, "retried") as held:
            assert held
            report = rep.make_report(folder)
            assert report.counts == {"completed": 6, "failed": 0, "running": 1, "pending": 1}, report.counts
            listed = rep.make_report(folder, include_all=True)
            assert sorted((r["run_ids"][0], r["status"], r["error"]) for r in listed.other_rows) == [
                ("retried", "running", None),
                ("waiting", "pending", None),
            ]
    finally:
        sweep.kill()
        sweep.wait()
    assert rep.make_report(folder).counts == {"completed": 6, "failed": 2, "running": 0, "pending": 0}
