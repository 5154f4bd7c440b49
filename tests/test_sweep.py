import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mnist_jobs.cli import app
from mnist_jobs.config import ConfigError
from mnist_jobs.grid import expand_grid, grid_values, read_sweep_file, sweep_run_id
from mnist_jobs.sweepdir import read_manifest

runner = CliRunner()
REFERENCE = Path(__file__).parent / "data" / "dry_run_lr_sweep.sbatch"
FAST = ["--iters", "20", "--eval-every", "10", "--device", "cpu"]


def test_grid_is_the_cartesian_product_without_duplicates():
    values = grid_values({"lr": "0.1,0.01", "seed": "0,1,2", "model": "logreg,logreg"})
    configs = expand_grid(values)
    assert len(configs) == 6
    assert {(c.lr, c.seed) for c in configs} == {(lr, s) for lr in (0.1, 0.01) for s in (0, 1, 2)}
    assert len({sweep_run_id(c) for c in configs}) == 6
    # epochs 5 and iters 3000 are the same run
    assert len(expand_grid(grid_values({"epochs": "5", "iters": None}))) == 1


def test_bad_lists_are_clear_errors():
    with pytest.raises(ConfigError, match="--lr has an empty value"):
        grid_values({"lr": "0.1,"})
    with pytest.raises(ConfigError, match="--seed is an empty list"):
        grid_values({}, {"seed": []})


def test_toml_file_gives_the_same_grid_and_cli_overrides(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('name = "lr-study"\nmodel = "logreg"\nlr = [0.1, 0.01]\nseed = [0, 1]\niters = 100\n')
    file_values = read_sweep_file(f)
    from_file = expand_grid(grid_values({}, file_values))
    from_cli = expand_grid(grid_values({"lr": "0.1,0.01", "seed": "0,1", "iters": "100"}))
    assert {sweep_run_id(c) for c in from_file} == {sweep_run_id(c) for c in from_cli}
    overridden = expand_grid(grid_values({"lr": "0.5"}, file_values))
    assert {c.lr for c in overridden} == {0.5} and len(overridden) == 2
    f.write_text("lr = [0.1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        read_sweep_file(f)
    f.write_text("lrr = [0.1]\n")
    with pytest.raises(ConfigError, match="unknown key.*lrr"):
        read_sweep_file(f)


def _normalise(text: str, results: Path) -> str:
    text = text.replace(str(results), "RESULTS")
    return re.sub(r"\S*/python3?(\.\d+)?\b", "PYTHON", text)


def test_dry_run_sbatch_matches_stored_reference(tmp_path):
    res = runner.invoke(
        app,
        [
            "sweep",
            "--lr",
            "0.001,0.01",
            "--partition",
            "gpu",
            "--gpus-per-node",
            "1",
            "--cpus-per-task",
            "2",
            "--mem-gb",
            "4",
            "--time-min",
            "30",
            "--max-parallel",
            "1",
            "--setup",
            "module load cuda",
            "--slurm-opt",
            "mail-type=END",
            "--name",
            "lr-study",
            "--dry-run",
            "--results-dir",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    script = res.output[res.output.index("#!/bin/bash") : res.output.index("dry run: nothing submitted")]
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --array=0-1%1" in script
    assert _normalise(script, tmp_path).strip() == REFERENCE.read_text().strip()
    assert not (tmp_path / "lr-study").exists()  # nothing written, nothing submitted


def test_local_sweep_in_process_resume_force_retry(tmp_path):
    args = [
        "sweep",
        "--lr",
        "0.05,0.1",
        "--seed",
        "0",
        *FAST,
        "--executor",
        "debug",
        "--name",
        "s",
        "--results-dir",
        str(tmp_path),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    manifest = read_manifest(tmp_path / "s")
    assert manifest["executor"] == "local" and len(manifest["runs"]) == 2
    results = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "s").glob("logreg-*.json")}
    assert set(results) == set(manifest["runs"])
    assert all(r["status"] == "completed" and r["sweep"] == "s" for r in results.values())
    assert {r["config"]["lr"] for r in results.values()} == {0.05, 0.1}

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "2 run(s) already completed: skipped" in again.output
    assert "nothing to submit" in again.output
    dry = runner.invoke(app, [*args, "--dry-run"])  # the dry run says the same
    assert dry.exit_code == 0 and "2 run(s) already completed: skipped" in dry.output
    assert "nothing to submit" in dry.output and "task" not in dry.output
    assert all(info["executor"] == "local" for info in manifest["runs"].values())  # (debug: a local kind)

    # a failed run is skipped unless --retry-failed
    victim = next(iter(results))
    rec = results[victim] | {"status": "failed", "error": {"type": "X", "message": "boom"}}
    (tmp_path / "s" / f"{victim}.json").write_text(json.dumps(rec))
    res = runner.invoke(app, args)
    assert "1 run(s) already failed: skipped (--retry-failed to rerun)" in res.output
    res = runner.invoke(app, [*args, "--retry-failed"])
    assert res.exit_code == 0
    assert json.loads((tmp_path / "s" / f"{victim}.json").read_text())["status"] == "completed"
    res = runner.invoke(app, [*args, "--force"])
    assert res.exit_code == 0 and "running 2 run(s)" in res.output
    assert read_manifest(tmp_path / "s")["runs"][victim]["attempts"] == 3


def test_local_executor_caps_concurrency(tmp_path):
    """Real subprocesses through submitit's LocalExecutor: never more than --max-parallel at once."""
    res = runner.invoke(
        app,
        [
            "sweep",
            "--lr",
            "0.01,0.02,0.03",
            *FAST,
            "--max-parallel",
            "2",
            "--name",
            "cap",
            "--results-dir",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    recs = [json.loads(p.read_text()) for p in (tmp_path / "cap").glob("logreg-*.json")]
    assert len(recs) == 3 and all(r["status"] == "completed" for r in recs)
    spans = [
        (
            datetime.fromisoformat(r["started_at"].rstrip("Z")),
            datetime.fromisoformat(r["finished_at"].rstrip("Z")),
        )
        for r in recs
    ]
    for start, _ in spans:
        assert sum(s <= start < e for s, e in spans) <= 2
    manifest = read_manifest(tmp_path / "cap")
    assert all(run["job_id"] for run in manifest["runs"].values())  # local job ids recorded
    logs = runner.invoke(app, ["logs", "cap", "--results-dir", str(tmp_path)])
    assert logs.exit_code == 0 and "test_acc" in logs.output


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to tell a share from 1 thread")
@pytest.mark.parametrize("omp", [None, "1"])
def test_a_local_job_trains_on_its_share_of_the_cores_unless_omp_num_threads_says(tmp_path, monkeypatch, omp):
    """One run at a time gets every core; a user's OMP_NUM_THREADS wins over that share (as it does
    for `train` in the foreground, where torch reads it)."""
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    args = [
        "sweep",
        "--lr",
        "0.01",
        *FAST,
        "--max-parallel",
        "1",
        "--name",
        "t",
        "--results-dir",
        str(tmp_path),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    [rec] = [json.loads(p.read_text()) for p in (tmp_path / "t").glob("logreg-*.json")]
    assert rec["env"]["torch_threads"] == (os.cpu_count() if omp is None else int(omp)), rec["env"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lr", "0.1", "--time-min", "0", "--partition", "gpu"], "--time-min must be >= 1"),
        (["--lr", "0.1", "--nodes", "-1", "--partition", "gpu"], "--nodes must be >= 1"),
        (["--lr", "0.1", "--pack", "0"], "--pack must be >= 1"),
        (["--lr", "0.1", "--nodes", "2", "--executor", "local"], "needs SLURM"),
        (["--lr", "0.1", "--executor", "kubernetes"], "--executor must be auto, slurm or local"),
        (["--lr", "0.1,,0.2"], "--lr has an empty value"),
        (
            [
                "--lr",
                ",".join(str(i / 1000 + 0.001) for i in range(101)),
                "--seed",
                ",".join(map(str, range(100))),
            ],
            "the grid has 10,100 runs",
        ),
        (["--lr", "0.1", "--slurm-opt", "novalue", "--partition", "gpu"], "--slurm-opt must be KEY=VALUE"),
        (["--config", "/nonexistent.toml"], "cannot read"),
    ],
)
def test_sweep_bad_input(tmp_path, args, needle):
    res = runner.invoke(app, ["sweep", *args, "--results-dir", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.json"))


def test_status_and_logs_of_unknown_sweep(tmp_path):
    res = runner.invoke(app, ["status", "nope", "--results-dir", str(tmp_path)])
    assert res.exit_code == 2 and "no sweep named 'nope'" in res.output
    res = runner.invoke(app, ["status", "--results-dir", str(tmp_path)])
    assert res.exit_code == 0
    res = runner.invoke(app, ["status", "--results-dir", str(tmp_path / "typo")])
    assert res.exit_code == 2 and res.output.startswith(f"Error: no folder {tmp_path / 'typo'}"), res.output


def test_logs_of_a_run_by_id_prefix_and_task(tmp_path):
    """`logs` takes a run id or a prefix of one: an exact id, or a prefix of one run, prints that run's
    logs; a prefix of several names them (exit 2) rather than picking one; --task picks a task (a DDP
    rank) of the job; empty log files are said to be empty, not printed as nothing."""
    res = runner.invoke(app, ["sweep", "--lr", "0.01,0.02", "--iters", "20", "--eval-every", "10",
                              "--device", "cpu", "--name", "two", "--results-dir", str(tmp_path)])  # fmt: skip
    assert res.exit_code == 0, res.output
    ids = sorted(read_manifest(tmp_path / "two")["runs"])
    common = ["--results-dir", str(tmp_path)]
    res = runner.invoke(app, ["logs", "two", "logreg-", *common])
    assert res.exit_code == 2 and "'logreg-' is the start of 2 runs of sweep 'two' (" in res.output
    assert all(i in res.output for i in ids) and res.output.count("\n") == 1, res.output
    for run in (ids[1], ids[1][:-2]):
        res = runner.invoke(app, ["logs", "two", run, *common])
        assert res.exit_code == 0 and "==> stdout" in res.output and "iter 20/20" in res.output, res.output
    res = runner.invoke(app, ["logs", "two", ids[1], "--task", "1", *common])
    assert res.exit_code == 0 and f"no log yet for {ids[1]}" in res.output and "task 1" in res.output
    job = read_manifest(tmp_path / "two")["runs"][ids[1]]["job_id"]
    for p in (tmp_path / "two" / "logs").glob(f"{job}_0_log.*"):
        p.write_text("")
    res = runner.invoke(app, ["logs", "two", ids[1], *common])
    assert res.exit_code == 0 and f"the logs of {ids[1]} (job {job}, task 0) are empty" in res.output


def test_dry_run_and_submit_without_slurm_installed(tmp_path, monkeypatch):
    """A laptop: no srun/sbatch on PATH. --dry-run still prints the script; submitting is one clear line;
    a sweep with nothing left to do says so."""
    args = [
        "sweep",
        "--lr",
        "0.001,0.01",
        "--iters",
        "20",
        "--eval-every",
        "10",
        "--device",
        "cpu",
        "--partition",
        "gpu",
        "--name",
        "lr-study",
        "--results-dir",
        str(tmp_path),
    ]
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    res = runner.invoke(app, [*args, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "#SBATCH --partition=gpu" in res.output and "#SBATCH --array=0-1%2" in res.output
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "SLURM not found on this machine" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "lr-study" / "sweep.json").exists()
    # the same runs completed (here, by a local sweep): nothing is left to submit, and it says so
    monkeypatch.setenv("PATH", path)
    local = [a for a in args if a not in ("--partition", "gpu")]
    assert runner.invoke(app, local).exit_code == 0
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "2 run(s) already completed: skipped\nnothing to submit" in res.output


# ---- packs: sized where they train, never with DDP, and the dry run shows the real grouping -------

PACK_GRID = ["--optimizer", "sgd,adam", "--lr", "0.1,0.01,0.001"]  # 6 runs, 2 optimizers of 3


def _dry_run_tasks(output: str) -> list[list[str]]:
    """The run ids of each task, as the dry run lists them ('task 0: id1, id2')."""
    tasks = re.findall(r"^\s*task (\d+): (.+)$", output, flags=re.MULTILINE)
    assert [int(i) for i, _ in tasks] == list(range(len(tasks))), output
    return [ids.strip().split(", ") for _, ids in tasks]


def test_slurm_pack_dry_run_is_not_sized_on_the_login_node(tmp_path):
    """--device cuda with --pack on this GPU-less machine: the dry run neither looks for a GPU nor sizes
    the pack (the real submission to the test cluster: test_slurm.py)."""
    args = ["sweep", "--lr", "0.01,0.1", "--pack", "2", "--partition", "gpu", "--gpus-per-node", "1"]
    args += ["--device", "cuda", "--iters", "10", "--name", "p", "--results-dir", str(tmp_path)]
    res = runner.invoke(app, [*args, "--dry-run"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "Traceback" not in res.output and not (tmp_path / "p").exists()
    assert "1 task(s) of at most 2 run(s) each" in res.output


def test_local_pack_is_still_sized_here(tmp_path, monkeypatch):
    import mnist_jobs.packing

    def too_big(config, n, device=None):
        assert str(device) == "cpu"  # sized on this machine's device
        raise mnist_jobs.packing.PackError(f"a pack of {n} does not fit; use --pack 1")

    monkeypatch.setattr(mnist_jobs.packing, "check_pack_fits", too_big)
    res = runner.invoke(
        app,
        ["sweep", "--lr", "0.01,0.1", "--pack", "2", *FAST, "--name", "p", "--results-dir", str(tmp_path)],
    )
    assert res.exit_code == 2, (res.output, res.exception)
    assert "a pack of 2 does not fit" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "p" / "sweep.json").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--tasks-per-node", "2"],
        ["--tasks-per-node", "2", "--dry-run"],
        ["--partition", "gpu", "--nodes", "2"],
        ["--partition", "gpu", "--nodes", "2", "--dry-run"],
        ["--partition", "gpu", "--gpus-per-node", "2", "--tasks-per-node", "2", "--dry-run"],
    ],
)
def test_pack_with_ddp_is_refused_before_anything(tmp_path, extra):
    res = runner.invoke(
        app, ["sweep", "--lr", "0.01,0.1", "--pack", "2", *FAST, *extra, "--results-dir", str(tmp_path / "r")]
    )
    assert res.exit_code == 2, (res.output, res.exception)
    assert "--pack 2 cannot be combined with several tasks per job" in res.output
    assert "Traceback" not in res.output and res.output.count("Error:") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra", [[], ["--partition", "gpu"]])
def test_pack_below_one_is_refused_in_dry_run(tmp_path, extra):
    res = runner.invoke(
        app,
        ["sweep", "--lr", "0.1", "--pack", "0", *extra, "--dry-run", "--results-dir", str(tmp_path / "r")],
    )
    assert res.exit_code == 2 and "--pack must be >= 1 (got 0)" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "r").exists()


def test_dry_run_groups_are_the_submitted_groups(tmp_path):
    """The dry run's array size and per-task runs come from the very grouping the submission uses."""
    from mnist_jobs.packing import group_for_packing

    fast = {"iters": "20", "eval_every": "10", "device": "cpu"}  # = FAST
    configs = expand_grid(grid_values({"optimizer": "sgd,adam", "lr": "0.1,0.01,0.001", **fast}))
    packs = group_for_packing(configs, 2)
    assert len(packs) == 4 != -(-len(configs) // 2)  # a grid where ceil(runs / pack) is wrong
    run_ids = [sweep_run_id(c) for c in configs]
    expected = {frozenset(run_ids[i] for i in g) for g in packs}

    common = ["sweep", *PACK_GRID, "--pack", "2", *FAST, "--name", "packs", "--results-dir", str(tmp_path)]
    res = runner.invoke(app, [*common, "--partition", "gpu", "--dry-run"])
    assert res.exit_code == 0, (res.output, res.exception)
    array = re.search(r"^#SBATCH --array=0-(\d+)", res.output, flags=re.MULTILINE)
    assert array and int(array.group(1)) + 1 == len(packs), res.output
    printed = _dry_run_tasks(res.output)
    assert {frozenset(t) for t in printed} == expected and len(printed) == len(packs)
    assert not (tmp_path / "packs").exists()

    local_dry = runner.invoke(app, [*common, "--dry-run"])
    assert local_dry.exit_code == 0 and _dry_run_tasks(local_dry.output) == printed

    res = runner.invoke(app, common)  # run it for real, here
    assert res.exit_code == 0, (res.output, res.exception)
    runs = read_manifest(tmp_path / "packs")["runs"]
    assert set(runs) == set(run_ids)
    assert {frozenset([rid, *info["packed_with"]]) for rid, info in runs.items()} == expected


def test_a_local_sweep_leaves_torch_to_its_worker(tmp_path):
    """Planning, preflight, pack sizing and the hand-off of a local packed sweep run in the CLI process
    without importing torch (about 1.4 s of start-up, 2.5 s with torch._dynamo): only the worker that
    trains imports it."""
    code = (
        "import sys\n"
        "from mnist_jobs.cli import app\n"
        "try:\n"
        f"    app({['sweep', '--lr', '0.01,0.1', '--pack', '2', *FAST, '--results-dir', str(tmp_path)]!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'the CLI process imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert len(list(tmp_path.glob("*/logreg-*.json"))) == 2  # and the worker did train


def test_checkpointed_runs_keep_their_packing_whatever_pack_says(tmp_path):
    """A pack's checkpoint holds its models stacked, in its order: the planner keeps the pack the
    manifest last recorded whole (and in that order) while its checkpoint is there, and a run with
    a lone checkpoint lone, whatever --pack says; the others are packed as asked. --force starts
    afresh, so it keeps nothing. A pack some of whose runs are done elsewhere is kept, carrying them.
    (End to end, a killed pack resumed with another --pack, or carrying a run: test_matrix.py.)"""
    from mnist_jobs.checkpoint import checkpoint_path, population_path
    from mnist_jobs.sweepdir import record_submission, resumable_packs

    lrs = ["0.1", "0.2", "0.3", "0.4", "0.5"]
    configs = expand_grid(
        grid_values({"lr": ",".join(lrs), "iters": "20", "eval_every": "10", "device": "cpu"})
    )
    a, b, c, d, e = (sweep_run_id(cfg) for cfg in configs)
    folder = tmp_path / "k"
    folder.mkdir()
    old = [[c, a, b], [d], [e]]  # as an earlier submission packed them (c first: the order is kept)
    runs = {
        r: {"config": {}, "job_id": None, "packed_with": [x for x in g if x != r]} for g in old for r in g
    }
    record_submission(folder, name="k", executor="local", grid={}, slurm=None, runs=runs)

    def tasks(*extra: str) -> list[list[str]]:
        args = ["sweep", "--lr", ",".join(lrs), *FAST, "--name", "k", "--results-dir", str(tmp_path)]
        res = runner.invoke(app, [*args, *extra, "--dry-run"])
        assert res.exit_code == 0, (res.output, res.exception)
        return _dry_run_tasks(res.output) if "task 0:" in res.output else [[r] for r in (a, b, c, d, e)]

    assert tasks("--pack", "5") == [[a, b, c, d, e]]  # no checkpoint: packed as asked
    population_path(folder, [c, a, b]).write_bytes(b"")
    checkpoint_path(folder, e).write_bytes(b"")
    assert tasks("--pack", "5") == [[c, a, b], [d], [e]]  # d: the only one left to pack
    assert tasks("--pack", "1") == [[c, a, b], [d], [e]]
    res = runner.invoke(app, ["sweep", "--lr", ",".join(lrs), *FAST, "--name", "k", "--pack", "2",
                              "--results-dir", str(tmp_path), "--dry-run"])  # fmt: skip
    assert "4 run(s) resume from their checkpoints; 1 pack(s) kept whole" in res.output, res.output
    assert tasks("--pack", "5", "--force") == [[a, b, c, d, e]]
    # a and c done (or training) elsewhere: the pack is kept whole, carrying them, if the grid has them
    assert resumable_packs(folder, [b, d, e], carriable=[a, b, c, d, e]) == [[c, a, b], [e]]
    assert resumable_packs(folder, [b, d, e], carriable=[b, c, d, e]) == [[e]]
    assert resumable_packs(folder, [b, d, e]) == [[e]]
    # a lone run of the pack's is not asked for: the pack cannot resume, its runs are packed anew
    res = runner.invoke(app, ["sweep", "--lr", "0.1,0.2,0.4", *FAST, "--name", "k", "--pack", "3",
                              "--results-dir", str(tmp_path), "--dry-run"])  # fmt: skip
    assert _dry_run_tasks(res.output) == [[a, b, d]]
    population_path(folder, [c, a, b]).unlink()  # the pack completed (or was dropped): packed as asked
    assert tasks("--pack", "5") == [[a, b, c, d], [e]]
