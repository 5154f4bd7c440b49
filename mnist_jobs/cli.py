"""The `mnist-jobs` command line: one command per verb, the docstring is the help.

torch and submitit are imported inside commands, so `mnist-jobs --help` stays instant. Every bad input
ends in one line on stderr, `Error: ...`, and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from typer._click import exceptions as click_exc  # typer 0.29 vendors click
from typer.core import TyperGroup

from .config import TRAIN_FIELDS, ConfigError, TrainConfig, train_config_from_options


class _OneLineErrors(TyperGroup):
    """Usage errors (unknown option, bad value, missing argument) as one line, exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exc.NoArgsIsHelpError as e:
            typer.echo(e.format_message())
            rv = 0
        except click_exc.ClickException as e:
            if not standalone_mode:
                raise
            typer.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    cls=_OneLineErrors,
    name="mnist-jobs",
    help="Run MNIST training jobs and hyperparameter sweeps, locally or on SLURM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Run MNIST training jobs and hyperparameter sweeps, locally or on SLURM.

    Start with `mnist-jobs train` (the tutorial run, about 82.5 % in a second on a CPU) or `mnist-jobs sweep --lr 0.001,0.01` (a grid; add --partition to submit it to SLURM).
    """


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


# ---- options shared by `train` and `sweep` (values are text; `sweep` accepts comma lists) --------

_D = TrainConfig()


def _opt(help: str, metavar: str, default: Any = None) -> Any:
    shown = str(default) if default is not None else False
    return typer.Option(help=help, metavar=metavar, show_default=shown, rich_help_panel="Training")


Model = Annotated[Optional[str], _opt("logreg or cnn.", "NAME", _D.model)]
Optimizer = Annotated[Optional[str], _opt("sgd or adam.", "NAME", _D.optimizer)]
Lr = Annotated[Optional[str], _opt("Learning rate > 0.", "FLOAT", f"{_D.lr:g}")]
Momentum = Annotated[Optional[str], _opt("SGD momentum >= 0.", "FLOAT", f"{_D.momentum:g}")]
WeightDecay = Annotated[Optional[str], _opt("L2 weight decay >= 0.", "FLOAT", f"{_D.weight_decay:g}")]
BatchSize = Annotated[Optional[str], _opt("Global batch size.", "INT", _D.batch_size)]
Epochs = Annotated[Optional[str], _opt("Epochs over the 60k training images (instead of --iters).", "INT")]
Iters = Annotated[Optional[str], _opt("Optimizer steps (3000 = 5 epochs of batch 100).", "INT", _D.iters)]
Seed = Annotated[Optional[str], _opt("Seed for init, shuffling and dropout.", "INT", _D.seed)]
EvalEvery = Annotated[Optional[str], _opt("Record test accuracy every N iterations.", "INT", _D.eval_every)]
Device = Annotated[
    Optional[str], _opt("auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.", "DEVICE", "auto")
]
DataDir = Annotated[
    Optional[Path],
    typer.Option(help="Folder holding MNIST/raw/ (default: the repo's data/).", rich_help_panel="Training"),
]
ResultsDir = Annotated[Path, typer.Option(help="Where JSON results go.")]


def _train_options(values: dict[str, Any]) -> dict[str, Any]:
    return {name: values[name] for name in TRAIN_FIELDS}


def _preflight(config: TrainConfig, data_dir: Path | None, results_dir: Path) -> None:
    """Everything that can be checked before training starts; any problem → one line, exit 2."""
    from .data import DataError, prepare
    from .device import DeviceError, select_device
    from .results import check_writable_dir

    try:
        check_writable_dir(results_dir)
        select_device(config.device)
        prepare(data_dir)
    except (OSError, DataError, DeviceError) as e:
        fail(str(e))


@app.command()
def train(
    model: Model = None,
    optimizer: Optimizer = None,
    lr: Lr = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    batch_size: BatchSize = None,
    epochs: Epochs = None,
    iters: Iters = None,
    seed: Seed = None,
    eval_every: EvalEvery = None,
    device: Device = None,
    data_dir: DataDir = None,
    results_dir: ResultsDir = Path("results"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With SLURM options: print the sbatch script, submit nothing.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="With SLURM options: follow the job until it ends.")
    ] = False,
    executor: Executor = "auto",
    partition: Partition = None,
    nodes: Nodes = None,
    gpus_per_node: GpusPerNode = None,
    tasks_per_node: TasksPerNode = None,
    cpus_per_task: CpusPerTask = None,
    mem_gb: MemGb = None,
    time_min: TimeMin = None,
    account: Account = None,
    qos: Qos = None,
    constraint: Constraint = None,
    exclusive: Exclusive = False,
    slurm_opt: SlurmOpt = None,
    setup: Setup = None,
    checkpoint_every: CheckpointEvery = None,
    max_requeues: MaxRequeues = 3,
) -> None:
    """Train one model on MNIST and write its JSON result.

    The defaults reproduce the tutorials' run: logistic regression, SGD lr 0.001, batch 100, 3000 iterations (about 82.5 % test accuracy). With a SLURM option (--partition gpu) the run is submitted as a SLURM job instead; follow it with `mnist-jobs status`.
    """
    v = dict(locals())
    try:
        config = train_config_from_options(_train_options(v))
        slurm = _slurm_config(v)
        _check_checkpoint_options(v)
    except ConfigError as e:
        fail(str(e))
    kind = _executor_kind(executor, v)
    if kind == "slurm" or slurm.tasks_per_node > 1 or slurm.nodes > 1 or kind == "debug":
        # Submitted (or multi-process) runs go through the sweep machinery: a one-run sweep.
        from .launch import sweep_run_id

        v.update(pack=1, max_parallel=None, retry_failed=False, force=True)
        _launch([config], {}, v, slurm, name=f"train-{sweep_run_id(config)}")
        return
    if checkpoint_every is not None or max_requeues != 3:
        typer.echo(
            "Warning: --checkpoint-every and --max-requeues apply to submitted runs (a sweep, or train "
            "with SLURM options or --tasks-per-node): a run in the foreground is not resumed",
            err=True,
        )
    _preflight(config, data_dir, results_dir)
    _run_local(config, data_dir, results_dir)


def _run_local(config: TrainConfig, data_dir: Path | None, results_dir: Path) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .train import train as run_training

    err = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(f"{config.model} lr={config.lr:g}", total=config.iters, loss="-", acc="-")

        def on_progress(p) -> None:
            fields = {"loss": f"{p.train_loss:.4f}"}
            if p.test_accuracy is not None:
                fields["acc"] = f"{p.test_accuracy:.2f}%"
            bar.update(task, completed=p.iteration, **fields)

        try:
            result = run_training(config, results_dir=results_dir, data_dir=data_dir, progress=on_progress)
        except Exception as e:  # the failed record is already written
            bar.stop()
            fail(f"training failed: {type(e).__name__}: {e} (record in {results_dir})", code=1)
    m, t = result["metrics"], result["timings"]
    typer.echo(
        f"test accuracy {m['test_accuracy']:.2f}%  (test loss {m['test_loss']:.4f}, "
        f"{m['iterations']} iters in {t['train_s']:.2f} s on {result['env']['device']})  "
        f"→ {result['result_path']}"
    )


# ---- SLURM / launch options (shared by `train` and `sweep`) ------------------------------------

_S = "SLURM (any of these submits to SLURM)"
Partition = Annotated[Optional[str], typer.Option(help="SLURM partition.", rich_help_panel=_S)]
Nodes = Annotated[Optional[int], typer.Option(help="Nodes per job. Default: 1.", rich_help_panel=_S)]
GpusPerNode = Annotated[Optional[int], typer.Option(help="GPUs per node (--gres gpu:N).", rich_help_panel=_S)]
TasksPerNode = Annotated[
    Optional[int],
    typer.Option(help="Processes per node (DDP ranks; works locally too). Default: 1.", rich_help_panel=_S),
]
CpusPerTask = Annotated[Optional[int], typer.Option(help="CPUs per task. Default: 1.", rich_help_panel=_S)]
MemGb = Annotated[Optional[float], typer.Option(help="Memory per node in GB.", rich_help_panel=_S)]
TimeMin = Annotated[
    Optional[int], typer.Option(help="Time limit in minutes. Default: 60.", rich_help_panel=_S)
]
Account = Annotated[Optional[str], typer.Option(help="SLURM account.", rich_help_panel=_S)]
Qos = Annotated[Optional[str], typer.Option(help="SLURM QOS.", rich_help_panel=_S)]
Constraint = Annotated[Optional[str], typer.Option(help="SLURM node constraint.", rich_help_panel=_S)]
Exclusive = Annotated[bool, typer.Option("--exclusive", help="Whole nodes only.", rich_help_panel=_S)]
SlurmOpt = Annotated[
    Optional[list[str]], typer.Option(help="Extra sbatch option KEY=VALUE (repeatable).", rich_help_panel=_S)
]
Setup = Annotated[
    Optional[list[str]],
    typer.Option(
        help="Shell line run before the job, e.g. 'module load cuda' (repeatable).", rich_help_panel=_S
    ),
]
Executor = Annotated[
    str, typer.Option(help="auto (slurm if any SLURM option is given), slurm or local.", rich_help_panel=_S)
]
_C = "Checkpoints (sweep runs and submitted train runs)"
CheckpointEvery = Annotated[
    Optional[int],
    typer.Option(
        help="Checkpoint every N iterations into <run_id>.ckpt.pt, a pack into pack-<hash>.ckpt.pt (0: only when stopped by a signal). Default: off below 2000 iterations, else every max(1000, iters/20).",
        metavar="N",
        rich_help_panel=_C,
    ),
]
MaxRequeues = Annotated[
    int,
    typer.Option(
        help="Requeue a job stopped by its time limit or a preemption at most N times; each attempt resumes from the checkpoint.",
        metavar="N",
        rich_help_panel=_C,
    ),
]

_SLURM_TRIGGERS = (
    "partition",
    "nodes",
    "gpus_per_node",
    "cpus_per_task",
    "mem_gb",
    "time_min",
    "account",
    "qos",
    "constraint",
    "slurm_opt",
    "setup",
)


def _slurm_config(v: dict[str, Any]):
    from .config import SlurmConfig, parse_slurm_opt

    given = {
        "partition": v["partition"],
        "nodes": v["nodes"],
        "tasks_per_node": v["tasks_per_node"],
        "gpus_per_node": v["gpus_per_node"],
        "cpus_per_task": v["cpus_per_task"],
        "mem_gb": v["mem_gb"],
        "time_min": v["time_min"],
        "account": v["account"],
        "qos": v["qos"],
        "constraint": v["constraint"],
    }
    kwargs = {k: val for k, val in given.items() if val is not None}
    kwargs["exclusive"] = v["exclusive"]
    kwargs["slurm_opts"] = tuple(parse_slurm_opt(s) for s in (v["slurm_opt"] or []))
    kwargs["setup"] = tuple(v["setup"] or [])
    return SlurmConfig(**kwargs)


def _executor_kind(requested: str, v: dict[str, Any]) -> str:
    if requested not in ("auto", "slurm", "local", "debug"):
        fail(f"--executor must be auto, slurm or local (got {requested!r})")
    if requested != "auto":
        return requested
    wants_slurm = any(v[k] not in (None, [], ()) for k in _SLURM_TRIGGERS) or v["exclusive"]
    return "slurm" if wants_slurm else "local"


@app.command()
def sweep(
    model: Model = None,
    optimizer: Optimizer = None,
    lr: Lr = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    batch_size: BatchSize = None,
    epochs: Epochs = None,
    iters: Iters = None,
    seed: Seed = None,
    eval_every: EvalEvery = None,
    device: Device = None,
    data_dir: DataDir = None,
    results_dir: ResultsDir = Path("results"),
    config: Annotated[
        Optional[Path],
        typer.Option("--config", help="TOML sweep file (lists = swept keys); CLI values override it."),
    ] = None,
    name: Annotated[
        Optional[str],
        typer.Option(help="Sweep name = folder under --results-dir. Default: derived from the grid."),
    ] = None,
    max_parallel: Annotated[
        Optional[int],
        typer.Option(help="At most N runs at once (SLURM array %N; local: default 1 per GPU, else 1)."),
    ] = None,
    pack: Annotated[
        int, typer.Option(help="Train up to N configs of one model/batch size together in one job.")
    ] = 1,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the grid and the sbatch script; submit nothing.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow SLURM jobs with a live table until all are done.")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Resubmit runs whose result says failed.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Rerun everything, even completed runs.")] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help=f"Allow grids larger than {10_000:,} runs.")
    ] = False,
    executor: Executor = "auto",
    partition: Partition = None,
    nodes: Nodes = None,
    gpus_per_node: GpusPerNode = None,
    tasks_per_node: TasksPerNode = None,
    cpus_per_task: CpusPerTask = None,
    mem_gb: MemGb = None,
    time_min: TimeMin = None,
    account: Account = None,
    qos: Qos = None,
    constraint: Constraint = None,
    exclusive: Exclusive = False,
    slurm_opt: SlurmOpt = None,
    setup: Setup = None,
    checkpoint_every: CheckpointEvery = None,
    max_requeues: MaxRequeues = 3,
) -> None:
    """Run a hyperparameter grid: every training option takes a comma list (--lr 0.001,0.01).

    With any SLURM option (--partition, --gpus-per-node, ...) the grid is submitted as a SLURM job array and the command returns; otherwise it runs on this machine. Runs that already have a completed result are skipped, so the same command resumes a sweep.
    """
    v = dict(locals())
    from .launch import MAX_GRID, expand_grid, grid_size, grid_values, read_sweep_file

    try:
        file_values = read_sweep_file(config) if config else {}
        values = grid_values(_train_options(v), file_values)
        size = grid_size(values)
        if size > MAX_GRID and not yes:
            fail(f"the grid has {size:,} runs (more than {MAX_GRID:,}); pass --yes to run it anyway")
        configs = expand_grid(values)
        slurm = _slurm_config({**v, **_file_slurm(file_values, v)})
        _check_checkpoint_options(v)
    except ConfigError as e:
        fail(str(e))
    _launch(configs, values, v, slurm, name=name or file_values.get("name"))


def _check_checkpoint_options(v: dict[str, Any]) -> None:
    for key in ("checkpoint_every", "max_requeues"):
        if v[key] is not None and v[key] < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 0 (got {v[key]})")


def _file_slurm(file_values: dict[str, Any], v: dict[str, Any]) -> dict[str, Any]:
    """[slurm] table values from a sweep file, where the CLI did not give them."""
    table = file_values.get("slurm") or {}
    out = {}
    for key, val in table.items():
        k = key.replace("-", "_")
        if k in v and v[k] in (None, False, []):
            out[k] = val
    return out


def _launch(configs, values, v: dict[str, Any], slurm, *, name: str | None) -> None:
    """Shared by `sweep` and `train --partition`: plan, dry-run, submit or run locally."""
    from rich.console import Console

    from .launch import default_sweep_name, plan_runs, sweep_run_id

    console = Console()
    kind = _executor_kind(v["executor"], v)
    if v["pack"] < 1:
        fail(f"--pack must be >= 1 (got {v['pack']})")
    if v["pack"] > 1 and (slurm.tasks_per_node > 1 or slurm.nodes > 1):
        fail(
            f"--pack {v['pack']} cannot be combined with several tasks per job (--tasks-per-node "
            f"{slurm.tasks_per_node}, --nodes {slurm.nodes}): a pack trains in one process"
        )
    if v["max_parallel"] is not None and v["max_parallel"] < 1:
        fail(f"--max-parallel must be >= 1 (got {v['max_parallel']})")
    if kind != "slurm" and slurm.nodes > 1:
        fail(f"--nodes {slurm.nodes} needs SLURM; the local executor runs on one node")
    _check_gpus_for_tasks(configs, slurm, kind)
    run_ids = [sweep_run_id(c) for c in configs]
    name = name or default_sweep_name(run_ids)
    if not name or "/" in name or name.startswith("."):
        fail(f"--name must be a plain folder name (got {name!r})")
    if len(name.encode(errors="surrogateescape")) > 200:
        fail(f"--name must be at most 200 bytes long (got {len(name.encode(errors='surrogateescape'))})")
    results_dir: Path = v["results_dir"]
    folder = results_dir / name
    by_id = dict(zip(run_ids, configs))
    console.print(f"sweep [bold]{name}[/]: {len(configs)} run(s), executor {kind}")

    if v["dry_run"]:
        _print_dry_run(console, configs, run_ids, values, folder, name, slurm, v, kind)
        return
    if kind == "slurm" and str(results_dir.resolve()).startswith("/tmp"):
        typer.echo(
            f"Warning: results dir {results_dir} is under /tmp: compute nodes may not see it", err=True
        )
    for c in configs:  # cheap preflight before anything is written or submitted
        if kind != "slurm":
            _preflight(c, v["data_dir"], results_dir)
    if kind == "slurm":
        _preflight_slurm(slurm)
        _preflight_common(v["data_dir"], results_dir)
    todo, skipped = plan_runs(
        folder, run_ids, retry_failed=v["retry_failed"], force=v["force"], executor=kind
    )
    for reason, ids in skipped.items():
        if ids:
            hint = " (--retry-failed to rerun)" if reason == "failed" else ""
            where = " (in another process)" if reason == "running" else ""
            console.print(f"  {len(ids)} run(s) already {reason}{where}: skipped{hint}")
    if not todo:
        console.print("nothing to submit")
        return
    tasks, groups = _make_tasks([by_id[r] for r in todo], todo, folder, v, kind)
    if v["force"]:  # a rerun starts from scratch, not from an earlier attempt's checkpoint
        from .checkpoint import checkpoint_path, population_path

        for run_id in todo:  # a lone attempt's
            checkpoint_path(folder, run_id).unlink(missing_ok=True)
        for group in groups:  # a pack's (one file per pack, named after its runs)
            population_path(folder, group).unlink(missing_ok=True)
    if kind == "slurm":
        _submit(console, name, folder, tasks, groups, values, slurm, v, by_id)
    else:
        _run_here(console, name, folder, tasks, groups, values, slurm, v, by_id, kind)


def _check_gpus_for_tasks(configs, slurm, kind: str) -> None:
    """DDP on CUDA puts one rank per GPU: refuse more tasks per node than GPUs before anything starts."""
    from .launch import local_gpu_count

    for c in configs:
        wants_cuda = c.device.startswith("cuda")
        if kind == "slurm":
            if wants_cuda and slurm.gpus_per_node == 0:
                fail(f"--device {c.device} on SLURM needs --gpus-per-node")
            if (wants_cuda or c.device == "auto") and 0 < slurm.gpus_per_node < slurm.tasks_per_node:
                fail(
                    f"--tasks-per-node {slurm.tasks_per_node} > --gpus-per-node {slurm.gpus_per_node}: "
                    "DDP on CUDA runs one task per GPU"
                )
        elif slurm.tasks_per_node > 1:
            gpus = local_gpu_count()
            if (wants_cuda or (c.device == "auto" and gpus)) and slurm.tasks_per_node > gpus:
                fail(
                    f"--tasks-per-node {slurm.tasks_per_node} with --device {c.device} needs "
                    f"{slurm.tasks_per_node} GPUs; this machine has {gpus}"
                )


def _preflight_slurm(slurm) -> None:
    """SLURM is there, the partition exists and its nodes can hold one job; else one line, exit 2."""
    from .launch import LaunchError, check_slurm_fits, sinfo_partitions

    try:
        check_slurm_fits(slurm, sinfo_partitions())
    except LaunchError as e:
        fail(str(e))


def _preflight_common(data_dir: Path | None, results_dir: Path) -> None:
    from .data import DataError, prepare
    from .results import check_writable_dir

    try:
        check_writable_dir(results_dir)
        prepare(data_dir)
    except (OSError, DataError) as e:
        fail(str(e))


def _plan_groups(configs, pack: int) -> list[list[int]]:
    """The runs each task trains, as indices into `configs`: one per task, or packs (--pack N).

    The one grouping both the submission and the dry run use, so the dry run shows the real tasks."""
    if pack <= 1:
        return [[i] for i in range(len(configs))]
    from .packed import PackError, group_for_packing

    try:
        return group_for_packing(configs, pack)
    except PackError as e:
        fail(str(e))


def _make_tasks(configs, run_ids, folder: Path, v: dict[str, Any], kind: str):
    """One TrainTask per run, or per pack of runs (--pack N).

    A pack is sized on the machine that trains it: here for the local executors; for SLURM the compute
    node checks it at run time (the login node may have no GPU, or another one)."""
    from .launch import TrainTask

    data_dir = str(v["data_dir"]) if v["data_dir"] else None
    groups = _plan_groups(configs, v["pack"])
    if kind != "slurm" and v["pack"] > 1:
        from .device import DeviceError, select_device
        from .packed import PackError, check_pack_fits

        for g in groups:
            try:
                check_pack_fits(configs[g[0]], len(g), select_device(configs[g[0]].device))
            except (PackError, DeviceError) as e:
                fail(str(e))
    tasks = [
        TrainTask(
            configs=[configs[i].to_dict() for i in g],
            run_ids=[run_ids[i] for i in g],
            results_dir=str(folder),
            data_dir=data_dir,
            extra={"sweep": folder.name},
            checkpoint_every=v["checkpoint_every"],
            max_requeues=v["max_requeues"],
            skip_completed=not v["force"],
        )
        for g in groups
    ]
    return tasks, [[run_ids[i] for i in g] for g in groups]


def _print_dry_run(console, configs, run_ids, values, folder, name, slurm, v, kind) -> None:
    from rich.table import Table

    from .launch import LOG_DIR, max_array_size, sbatch_text, slurm_executor

    swept = [k for k, vals in values.items() if len(vals) > 1] or ["lr"]
    table = Table(title=f"grid of {name}")
    table.add_column("run id")
    for k in swept:
        table.add_column(k, justify="right")
    for rid, c in zip(run_ids, configs):
        table.add_row(rid, *(str(getattr(c, k)) for k in swept))
    console.print(table)
    groups = _plan_groups(configs, v["pack"])
    n_tasks = len(groups)
    if v["pack"] > 1:
        console.print(f"{n_tasks} task(s) of at most {v['pack']} run(s) each (packs as submitted):")
        for i, g in enumerate(groups):  # plain lines, never wrapped: one task per line
            typer.echo(f"  task {i}: {', '.join(run_ids[j] for j in g)}")
    else:
        console.print(f"{n_tasks} task(s), one run each")
    if kind == "slurm":
        ex = slurm_executor(
            folder / LOG_DIR, name, slurm, v["max_parallel"], dry_run=True, max_requeues=v["max_requeues"]
        )
        limit = max_array_size()
        per = min(n_tasks, limit) if limit else n_tasks
        if limit and n_tasks > limit:
            console.print(f"{n_tasks} tasks > MaxArraySize {limit}: {-(-n_tasks // limit)} arrays")
        typer.echo(sbatch_text(ex, per))
    console.print("dry run: nothing submitted")


def _submit(console, name, folder, tasks, groups, values, slurm, v, by_id) -> None:
    from .launch import LOG_DIR, LaunchError, max_array_size, record_submission, slurm_executor, submit_slurm

    try:
        ex = slurm_executor(folder / LOG_DIR, name, slurm, v["max_parallel"], max_requeues=v["max_requeues"])
    except LaunchError as e:
        fail(str(e))
    limit = max_array_size()
    new_folder = not folder.exists()
    try:
        job_chunks = submit_slurm(ex, tasks, limit)
        error = None
    except LaunchError as e:
        job_chunks, error = e.done, e  # type: ignore[attr-defined]
        if not job_chunks and new_folder:  # refused outright: leave no trace (submitit's script)
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    job_ids = [j for chunk in job_chunks for j in chunk]
    runs = {}
    for group, job_id in zip(groups, job_ids):
        for run_id in group:
            runs[run_id] = {
                "config": by_id[run_id].to_dict(),
                "job_id": job_id,
                "packed_with": [r for r in group if r != run_id],
            }
    if runs:  # the manifest only ever lists what was really submitted
        record_submission(folder, name=name, executor="slurm", grid=values, slurm=slurm.to_dict(), runs=runs)
    if error is not None:
        fail(
            f"sbatch refused the submission: {error}"
            + (f" ({len(runs)} run(s) submitted before)" if runs else "")
        )
    arrays = sorted({j.split("_")[0] for j in job_ids})
    console.print(
        f"submitted {len(runs)} run(s) as {len(tasks)} task(s) in job(s) {', '.join(arrays)}"
        f" (partition {slurm.partition or 'default'})"
    )
    console.print(f"  results: {folder}/   logs: {folder / LOG_DIR}/")
    console.print(f"  follow:  mnist-jobs status {name} --results-dir {v['results_dir']}")
    if v["wait"]:
        _follow(console, folder)


def _run_here(console, name, folder, tasks, groups, values, slurm, v, by_id, kind) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .launch import (
        COMPLETED_ELSEWHERE,
        LOG_DIR,
        RUNNING_ELSEWHERE,
        local_gpu_count,
        record_submission,
        run_local,
    )

    parallel = v["max_parallel"] or max(1, local_gpu_count())
    runs = {
        r: {"config": by_id[r].to_dict(), "job_id": None, "packed_with": [x for x in g if x != r]}
        for g in groups
        for r in g
    }
    record_submission(folder, name=name, executor="local", grid=values, slurm=None, runs=runs)
    console.print(
        f"running {len(runs)} run(s) here, {min(parallel, len(tasks))} at a time; results in {folder}/"
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        t = bar.add_task("runs", total=len(tasks))
        elsewhere: list[str] = []

        def on_event(what: str, i: int, obj: Any) -> None:
            if what == "started" and kind == "local":
                ids = {r: {**runs[r], "job_id": str(obj.job_id)} for r in groups[i]}
                record_submission(
                    folder, name=name, executor="local", grid=values, slurm=None, runs=ids, new_attempt=False
                )
            if what == "finished":
                bar.advance(t)
                said: dict[str, str] = {}  # what the task says it did with each run
                with contextlib.suppress(Exception):  # (a failed job has no output)
                    said = {o["run_id"]: o["status"] for o in obj.results()[0]}
                for rid in groups[i]:
                    if said.get(rid) == RUNNING_ELSEWHERE:
                        elsewhere.append(rid)
                        bar.console.print(f"  {rid}: being trained by another process, not here")
                        continue
                    if said.get(rid) == COMPLETED_ELSEWHERE:
                        bar.console.print(f"  {rid}: completed meanwhile by another process")
                        continue
                    _, data = _result(folder, rid)
                    acc = data["metrics"].get("test_accuracy") if data else None
                    status = data["status"] if data else "missing"
                    bar.console.print(f"  {rid}: {status}" + (f"  {acc:.2f}%" if acc is not None else ""))

        states = run_local(
            folder / LOG_DIR,
            tasks,
            max_parallel=parallel,
            tasks_per_node=slurm.tasks_per_node,
            on_event=on_event,
            executor_kind=kind,
        )
    failed = sum(s != "COMPLETED" for s in states)
    console.print(
        f"done: {len(states) - failed} task(s) completed, {failed} failed"
        + (f"; {len(elsewhere)} run(s) left to the process already training them" if elsewhere else "")
    )
    if failed:
        raise typer.Exit(1)


def _result(folder: Path, run_id: str):
    from .launch import result_status

    return result_status(folder, run_id)


def _follow(console, folder: Path, interval_s: float = 2.0) -> None:
    from rich.live import Live

    from .launch import run_states

    with Live(console=console, refresh_per_second=2) as live:
        while True:
            rows = run_states(folder)
            live.update(_status_table(folder.name, rows))
            if all(r["state"] in ("COMPLETED", "FAILED", "CANCELLED", "MISSING") for r in rows):
                break
            time.sleep(interval_s)


def _status_table(name: str, rows: list[dict[str, Any]]):
    from collections import Counter

    from rich.table import Table

    varying = sorted(
        {
            k
            for r in rows
            for k in r["config"]
            if len({json.dumps(x["config"].get(k)) for x in rows}) > 1 and k != "epochs"
        }
    )
    counts = Counter(r["state"] for r in rows)
    colours = {"COMPLETED": "green", "FAILED": "red", "RUNNING": "cyan", "PENDING": "yellow"}
    table = Table(title=f"{name}: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())))
    table.add_column("run id")
    for k in varying:
        table.add_column(k, justify="right")
    table.add_column("job id")
    table.add_column("state")
    table.add_column("test acc %", justify="right")
    for r in rows:
        acc = f"{r['test_accuracy']:.2f}" if r["test_accuracy"] is not None else ""
        c = colours.get(r["state"], "white")
        table.add_row(
            r["run_id"],
            *(str(r["config"].get(k)) for k in varying),
            r["job_id"] or "",
            f"[{c}]{r['state']}[/]",
            acc,
        )
    return table


SweepName = Annotated[Optional[str], typer.Argument(help="Sweep name (folder under --results-dir).")]


def _sweep_folder(name: str, results_dir: Path) -> Path:
    folder = results_dir / name
    if not (folder / "sweep.json").exists():
        fail(f"no sweep named {name!r} under {results_dir} (no {folder}/sweep.json)")
    return folder


@app.command()
def status(
    name: SweepName = None,
    results_dir: ResultsDir = Path("results"),
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until every run is done.")] = False,
) -> None:
    """Show the state of each run of a sweep (pending, running, completed, failed), or list sweeps."""
    from rich.console import Console
    from rich.table import Table

    from .launch import list_sweeps, read_manifest, run_states

    console = Console()
    if name is None:
        table = Table(title=f"sweeps under {results_dir}")
        for col in ("name", "executor", "runs", "completed", "failed", "updated"):
            table.add_column(col)
        for folder in list_sweeps(results_dir):
            m = read_manifest(folder) or {}
            rows = run_states(folder)
            table.add_row(
                folder.name,
                m.get("executor", "?"),
                str(len(rows)),
                str(sum(r["state"] == "COMPLETED" for r in rows)),
                str(sum(r["state"] == "FAILED" for r in rows)),
                m.get("updated_at", ""),
            )
        console.print(table)
        return
    folder = _sweep_folder(name, results_dir)
    if watch:
        _follow(console, folder)
    else:
        console.print(_status_table(name, run_states(folder)))


@app.command()
def logs(
    name: Annotated[str, typer.Argument(help="Sweep name.")],
    run: Annotated[
        Optional[str], typer.Argument(help="Run id (or a unique prefix); default: the only/first run.")
    ] = None,
    results_dir: ResultsDir = Path("results"),
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output until the job ends.")
    ] = False,
) -> None:
    """Print a run's stdout and stderr (from its SLURM/local job)."""
    from .launch import log_paths, read_manifest, run_states

    folder = _sweep_folder(name, results_dir)
    manifest = read_manifest(folder) or {"runs": {}}
    ids = list(manifest["runs"])
    match = [r for r in ids if run is None or r.startswith(run)]
    if not match:
        fail(f"no run {run!r} in sweep {name!r} (runs: {', '.join(ids[:5])}{'…' if len(ids) > 5 else ''})")
    run_id = match[0]
    job_id = manifest["runs"][run_id].get("job_id")
    if not job_id:
        fail(f"run {run_id} has no job id yet (local runs keep logs under {folder}/logs)")
    out, err = log_paths(folder, job_id)
    positions = {out: 0, err: 0}
    while True:
        for path, label in ((out, "stdout"), (err, "stderr")):
            if path.exists():
                with open(path, errors="replace") as f:
                    f.seek(positions[path])
                    text = f.read()
                    positions[path] = f.tell()
                if text:
                    typer.echo(f"==> {label}: {path} <==" if not follow else text, nl=not follow)
                    if not follow:
                        typer.echo(text)
        if not follow:
            if not out.exists() and not err.exists():
                typer.echo(f"no log yet for {run_id} (job {job_id}): expected {out}")
            return
        state = next((r["state"] for r in run_states(folder) if r["run_id"] == run_id), "MISSING")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "MISSING"):
            return
        time.sleep(1.0)


@app.command()
def cancel(
    name: Annotated[str, typer.Argument(help="Sweep name.")],
    results_dir: ResultsDir = Path("results"),
) -> None:
    """Cancel (scancel) every run of a sweep that is still queued or running."""
    from .launch import cancel_jobs, run_states

    folder = _sweep_folder(name, results_dir)
    rows = run_states(folder)
    live = sorted(
        {
            r["job_id"]
            for r in rows
            if r["job_id"]
            and r["state"] in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED")
        }
    )
    if not live:
        typer.echo(f"nothing to cancel in {name}")
        return
    cancel_jobs(live)
    typer.echo(f"cancelled {len(live)} job(s): {', '.join(live)}")


# ---- report --------------------------------------------------------------------------------------


@app.command()
def report(
    path: Annotated[
        Path, typer.Argument(help="A results folder (searched recursively) or one result file.")
    ] = Path("results"),
    sort: Annotated[
        Optional[str],
        typer.Option(
            "--sort",
            help="Sort rows by a metric or config key (test_accuracy, test_loss, train_s, lr, ...); accuracy and throughput best first, the rest ascending. Default: by the varying settings.",
            metavar="KEY",
        ),
    ] = None,
    top: Annotated[
        Optional[int],
        typer.Option(
            "--top",
            min=1,
            help="Show the first N rows only (best by test accuracy unless --sort).",
            metavar="N",
        ),
    ] = None,
    group_by: Annotated[
        Optional[str],
        typer.Option(
            "--group-by",
            help="Comma list of config keys, one row per combination with mean ± std over the other keys. Default: every varying setting except the seed.",
            metavar="KEYS",
        ),
    ] = None,
    no_group: Annotated[bool, typer.Option("--no-group", help="One row per run.")] = False,
    filters: Annotated[
        Optional[list[str]],
        typer.Option(
            "--filter",
            help="Keep runs where KEY=VALUE (typed: lr=1e-2 matches 0.01; VALUE may be a comma list; also !=, <, <=, >, >=). Repeatable: all must hold.",
            metavar="KEY=VALUE",
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="table, csv, json or markdown (plain data on stdout, fixed columns).",
            metavar="FORMAT",
        ),
    ] = "table",
    plot: Annotated[
        Optional[Path],
        typer.Option(
            "--plot",
            help="Also write a PNG: accuracy vs each swept setting (± std over seeds) and accuracy curves. Needs the `plot` extra (matplotlib).",
            metavar="FILE.png",
        ),
    ] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also list failed, running and pending runs, one row each.")
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Fail (exit 2) on JSON files that are not readable results instead of skipping them.",
        ),
    ] = False,
) -> None:
    """Summarize a folder of JSON results: one row per configuration, seeds averaged (mean ± std, n).

    Only the settings that vary get columns; the best row is highlighted; failed, running and pending runs (a sweep's runs with no result yet) are counted below the table.
    """
    from . import report as rep

    formats = {
        "table": None,
        "csv": rep.to_csv,
        "json": rep.to_json,
        "markdown": rep.to_markdown,
        "md": rep.to_markdown,
    }
    if fmt not in formats:
        fail(f"--format must be table, csv, json or markdown (got {fmt!r})")
    try:
        result = rep.make_report(
            path,
            sort=sort,
            top=top,
            group_by=group_by,
            group=not no_group,
            filters=filters or (),
            include_all=show_all,
        )
    except rep.ReportError as e:
        fail(str(e))
    if result.skipped:
        n, why = len(result.skipped), result.skipped[0][1]
        files = f"{n} unreadable or foreign JSON file{'s' if n != 1 else ''}"
        if strict:
            fail(f"{files} (e.g. {why})")
        typer.echo(f"Warning: skipped {files} (e.g. {why}); --strict makes this an error", err=True)
    if plot is not None:
        try:
            written = rep.plot(result, plot)
        except (rep.ReportError, OSError) as e:
            fail(str(e))
        except ValueError as e:  # matplotlib: a file name whose suffix is no image format it knows
            fail(f"--plot {plot}: {e}")
        typer.echo(f"plot → {written}", err=True)
    to_text = formats[fmt]
    if to_text is not None:
        sys.stdout.write(to_text(result))
        return
    import os

    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)  # piped into a file or a pager: do not squeeze into 80 columns
    if not result.rows and not result.other_rows:
        console.print(f"No results to show under {path}. {rep.footer(result)}", highlight=False)
        return
    console.print(rep.build_table(result))
