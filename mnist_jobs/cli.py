"""The `mnist-jobs` command line: one command per verb, the docstring is the help.

torch and submitit are imported inside commands, so `mnist-jobs --help` stays instant. Every bad input
ends in one line on stderr, `Error: ...`, and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
import time
import typing
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from typer._click import exceptions as click_exc  # typer 0.29 vendors click
from typer.core import TyperGroup

from .config import TRAIN_FIELDS, ConfigError, TrainConfig, option_name, train_config_from_options


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
Momentum = Annotated[Optional[str], _opt("SGD momentum in [0, 1) (SGD only).", "FLOAT", f"{_D.momentum:g}")]
WeightDecay = Annotated[Optional[str], _opt("L2 weight decay >= 0.", "FLOAT", f"{_D.weight_decay:g}")]
Schedule = Annotated[
    Optional[str], _opt("Learning-rate schedule: constant, cosine or onecycle.", "NAME", _D.schedule)
]
Warmup = Annotated[
    Optional[str],
    _opt(
        "Warm-up, a fraction of the iterations in [0, 1): linear for constant/cosine (default 0), "
        "onecycle's rise from lr/25 (default 0.3).",
        "FRACTION",
    ),
]
Normalize = Annotated[
    Optional[str],
    _opt("on: standardise the images (MNIST mean 0.1307, std 0.3081); or off.", "on|off", "off"),
]
Deskew = Annotated[
    Optional[str],
    _opt(
        "on: slant-normalise the images (MNIST's classic deskewing by image moments), before --normalize; "
        "or off.",
        "on|off",
        "off",
    ),
]
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

    try:  # the results folder last: checking it creates it
        select_device(config.device)
        prepare(data_dir)
        check_writable_dir(results_dir)
    except (OSError, DataError, DeviceError) as e:
        fail(str(e))


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
# Every SLURM option, once: CLI name (the SlurmConfig field's, but slurm_opt) -> (type, default).
SLURM_OPTIONS: dict[str, tuple[Any, Any]] = {
    "partition": (Partition, None),
    "nodes": (Nodes, None),
    "gpus_per_node": (GpusPerNode, None),
    "tasks_per_node": (TasksPerNode, None),
    "cpus_per_task": (CpusPerTask, None),
    "mem_gb": (MemGb, None),
    "time_min": (TimeMin, None),
    "account": (Account, None),
    "qos": (Qos, None),
    "constraint": (Constraint, None),
    "exclusive": (Exclusive, False),
    "slurm_opt": (SlurmOpt, None),
    "setup": (Setup, None),
}
Executor = Annotated[
    str, typer.Option(help="auto (slurm if any SLURM option is given), slurm or local.", rich_help_panel=_S)
]
_C = "Checkpoints (sweep runs and submitted train runs)"
_R = "Random search (sweep; sampled options: KIND:LOW:HIGH, uniform or loguniform)"
CheckpointEvery = Annotated[
    Optional[int],
    typer.Option(
        help="Checkpoint every N iterations into <run_id>.ckpt.pt, a pack into pack-<hash>.ckpt.pt (0: only when stopped by a signal). Default: off below 2000 iterations, else every max(1000, iters/20); a train in the foreground: only when stopped (Ctrl-C).",
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


def _slurm_options(command):
    """Give a command every SLURM option of SLURM_OPTIONS (typer reads the signature); the command
    receives them as one `slurm` dict keyed by SlurmConfig field. One table for `train` and `sweep`:
    adding a SLURM option is a SlurmConfig field and its line in SLURM_OPTIONS."""
    sig = inspect.signature(command)
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
        for name, (annotation, default) in SLURM_OPTIONS.items()
    ]
    # the annotations as objects, not this module's strings (`from __future__ import annotations`):
    # typer reads the options' help from them, and cannot resolve strings through this wrapper
    hints = typing.get_type_hints(command, include_extras=True)
    params = [p.replace(annotation=hints[p.name]) for p in sig.parameters.values() if p.name != "slurm"]

    @functools.wraps(command)
    def with_slurm(**kwargs: Any) -> Any:
        slurm = {_SLURM_OPTION_FIELD.get(n, n): kwargs.pop(n) for n in SLURM_OPTIONS}
        return command(**kwargs, slurm=slurm)

    with_slurm.__signature__ = sig.replace(parameters=params + extra)  # type: ignore[attr-defined]
    return with_slurm


@app.command()
@_slurm_options
def train(
    model: Model = None,
    optimizer: Optimizer = None,
    lr: Lr = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    schedule: Schedule = None,
    warmup: Warmup = None,
    normalize: Normalize = None,
    deskew: Deskew = None,
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
    slurm: dict[str, Any] | None = None,  # the SLURM options (SLURM_OPTIONS), added by @_slurm_options
    checkpoint_every: CheckpointEvery = None,
    max_requeues: MaxRequeues = 3,
) -> None:
    """Train one model on MNIST and write its JSON result.

    The defaults reproduce the tutorials' run: logistic regression, SGD lr 0.001, batch 100, 3000 iterations (about 82.5 % test accuracy). With a SLURM option (--partition gpu) the run is submitted as a SLURM job instead; follow it with `mnist-jobs status`. Ctrl-C checkpoints a run in the foreground, and the same command again resumes it. A submitted run (SLURM options, or --tasks-per-node) is a one-run sweep, train-<run id>: the same command again resumes it when stopped and leaves it be once completed.
    """
    v = dict(locals())
    try:
        config = train_config_from_options(_train_options(v))
        # a submitted (or multi-process) run is a one-run sweep: the same command again resumes it
        # when stopped, and leaves it be once completed (its result is never overwritten)
        opts = _sweep_options(v)
    except ConfigError as e:
        fail(str(e))
    if opts.executor != "local" or opts.slurm.tasks_per_node > 1:
        from .grid import sweep_run_id

        _launch(opts, dry_run=dry_run, wait=wait, name=f"train-{sweep_run_id(config)}")
        return
    if max_requeues != 3:
        typer.echo(
            "Warning: --max-requeues applies to submitted runs (a sweep, or train with SLURM options or "
            "--tasks-per-node): a run in the foreground is never requeued",
            err=True,
        )
    _preflight(config, data_dir, results_dir)
    _run_local(config, data_dir, results_dir, checkpoint_every)


def _run_local(config: TrainConfig, data_dir: Path | None, results_dir: Path, checkpoint_every) -> None:
    """A run in the foreground: Ctrl-C (or SIGTERM, a closed terminal) checkpoints it and stops, and
    the same command again resumes it (train.resumable_run_id)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .checkpoint import checkpoint_path
    from .train import STOP_SIGNALS, Interrupted, StopFlag, default_run_id, resumable_run_id, stopping_on
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

        run_id = resumable_run_id(config, results_dir) or default_run_id(config)
        stop = StopFlag()
        try:
            with stopping_on(stop, STOP_SIGNALS):
                result = run_training(
                    config, run_id=run_id, results_dir=results_dir, data_dir=data_dir, progress=on_progress,
                    stop=stop, checkpoint_every=checkpoint_every or 0,  # (default: only when stopped)
                )  # fmt: skip
        except Interrupted as e:  # checkpointed at the iteration it stopped at; no record written
            bar.stop()
            fail(
                f"interrupted at iteration {e.iteration}: checkpoint {checkpoint_path(results_dir, run_id)}; "
                "the same command again resumes it",
                code=130,
            )
        except Exception as e:  # the failed record is already written
            bar.stop()
            fail(f"training failed: {type(e).__name__}: {e} (record in {results_dir})", code=1)
    m, t = result["metrics"], result["timings"]
    typer.echo(
        f"test accuracy {m['test_accuracy']:.2f}%  (test loss {m['test_loss']:.4f}, "
        f"{m['iterations']} iters in {t['train_s']:.2f} s on {result['env']['device']})  "
        f"→ {result['result_path']}"
    )


@app.command()
@_slurm_options
def sweep(
    model: Model = None,
    optimizer: Optimizer = None,
    lr: Lr = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    schedule: Schedule = None,
    warmup: Warmup = None,
    normalize: Normalize = None,
    deskew: Deskew = None,
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
    samples: Annotated[
        Optional[int],
        typer.Option(
            help="Random search: draw N points from the sampled options (--lr loguniform:1e-4:1e-1, --momentum uniform:0:0.99); each point is crossed with the listed values (--seed 0,1,2).",
            metavar="N",
            rich_help_panel=_R,
        ),
    ] = None,
    search_seed: Annotated[
        Optional[int],
        typer.Option(
            help="Seed of the random search: the same seed draws the same points (and so the same runs). Default: 0.",
            metavar="SEED",
            rich_help_panel=_R,
        ),
    ] = None,
    executor: Executor = "auto",
    slurm: dict[str, Any] | None = None,  # the SLURM options (SLURM_OPTIONS), added by @_slurm_options
    checkpoint_every: CheckpointEvery = None,
    max_requeues: MaxRequeues = 3,
) -> None:
    """Run a hyperparameter grid: every training option takes a comma list (--lr 0.001,0.01).

    Random search: --lr loguniform:1e-4:1e-1 --momentum uniform:0:0.99 --samples 20 (lr, momentum, weight decay, warmup, batch size, epochs, iters can be sampled). With any SLURM option (--partition, --gpus-per-node, ...) the grid is submitted as a SLURM job array and the command returns; otherwise it runs on this machine. Runs that already have a completed result are skipped, so the same command resumes a sweep.
    """
    v = dict(locals())
    try:
        opts = _sweep_options(v, config_file=config, name=name, allow_huge=yes)
    except ConfigError as e:
        fail(str(e))
    _launch(opts, dry_run=dry_run, wait=wait)


# CLI option name -> SlurmConfig field (the same name, but for these two)
_SLURM_OPTION_FIELD = {"slurm_opt": "slurm_opts"}


def _sweep_options(v: dict[str, Any], *, config_file: Path | None = None, **extra: Any):
    """The typed options of a launch from this command's values (and a sweep file)."""
    from .launch import SweepOptions

    slurm = v["slurm"]
    keys = ("pack", "max_parallel", "retry_failed", "force", "checkpoint_every", "samples", "search_seed")
    behaviour = {k: v[k] for k in keys if k in v}
    return SweepOptions.from_sources(
        training=_train_options(v),
        slurm=slurm,
        config_file=config_file,
        executor=v["executor"],
        results_dir=v["results_dir"],
        data_dir=v["data_dir"],
        max_requeues=v["max_requeues"],
        **{**behaviour, **extra},
    )


def _launch(opts, *, dry_run: bool, wait: bool, name: str | None = None) -> None:
    """Shared by `sweep` and `train --partition`: plan, dry-run, submit or run here (launch.py does the
    work; this renders it)."""
    from rich.console import Console

    from . import launch
    from .slurm import LaunchError
    from .sweepdir import submitting

    console = Console()
    try:
        plan = launch.make_plan(opts, name=name)
        console.print(f"sweep [bold]{plan.name}[/]: {len(plan.configs)} run(s), executor {plan.executor}")
        if opts.ignored_here:  # e.g. a sweep file written for the cluster, debugged on a laptop
            typer.echo(
                f"Warning: --executor {plan.executor} runs here: SLURM option(s) ignored: "
                + ", ".join(opts.ignored_here),
                err=True,
            )
        if dry_run:  # what the same command would submit now: the runs left to do, as it groups them
            todo, skipped = plan.todo()
            _print_dry_run(console, plan, launch.dry_run(plan, todo), skipped)
            return
        if plan.executor == "slurm" and str(opts.results_dir.resolve()).startswith("/tmp"):
            typer.echo(
                f"Warning: results dir {opts.results_dir} is under /tmp: compute nodes may not see it",
                err=True,
            )
        todo, skipped = plan.todo()
        if todo:  # (a sweep with nothing left to do says so, even where SLURM is not installed)
            launch.preflight(plan)
        with submitting(plan.folder) as new_folder:  # (a concurrent sweep sees these runs queued)
            if todo:
                todo, skipped = plan.todo()
            _print_skipped(console, skipped)
            if not todo:
                console.print("nothing to submit")
                return
            tasks, groups = launch.make_tasks(plan, todo)
            _print_resumed(plan.resumed(todo), todo)
            if plan.executor == "slurm":
                sub = launch.submit(plan, tasks, groups, new_folder=new_folder)
        if plan.executor != "slurm":
            _run_here(console, plan, tasks, groups)
            return
    except (ConfigError, LaunchError) as e:
        fail(str(e))
    from .sweepdir import LOG_DIR

    console.print(
        f"submitted {sub.runs} run(s) as {sub.tasks} task(s) in job(s) {', '.join(sub.arrays)}"
        f" (partition {opts.slurm.partition or 'default'})"
    )
    console.print(f"  results: {plan.folder}/   logs: {plan.folder / LOG_DIR}/")
    console.print(f"  follow:  mnist-jobs status {plan.name} --results-dir {opts.results_dir}")
    if wait:  # as a local sweep does: exit 1 unless every run it submitted completed (`... && report`)
        mine = {r for g in groups for r in g}
        rows = _follow(console, plan.folder)
        if not_done := [r for r in rows if r["run_id"] in mine and r["state"] != "COMPLETED"]:
            typer.echo(f"{len(not_done)} run(s) submitted did not complete", err=True)
            raise typer.Exit(1)


def _print_skipped(console, skipped: dict[str, list[str]]) -> None:
    for reason, ids in skipped.items():
        if ids:
            hint = " (--retry-failed to rerun)" if reason == "failed" else ""
            where = " (in another process)" if reason == "running" else ""
            console.print(f"  {len(ids)} run(s) already {reason}{where}: skipped{hint}")


def _print_dry_run(console, plan, dry, skipped: dict[str, list[str]]) -> None:
    from rich.table import Table

    swept = plan.swept or ["lr"]
    search = plan.options.search
    if search is not None:
        from .grid import grid_size

        listed = grid_size(plan.options.grid)
        drawn = len({tuple(getattr(c, k) for k in search.names) for c in plan.configs})
        fewer = f" (the space holds only {drawn} distinct ones)" if drawn < search.samples else ""
        typer.echo(  # plain lines, never wrapped
            f"random search: {search.samples} point(s) drawn with search seed {search.seed}{fewer}, "
            f"each crossed with {listed} listed combination(s):"
        )
        for d in search.space:
            typer.echo(f"  {option_name(d.name)} {d.spec()}")
    table = Table(title=f"{'runs' if search else 'grid'} of {plan.name}")
    table.add_column("run id")
    for k in swept:
        table.add_column(k, justify="right")
    for rid, c in zip(plan.run_ids, plan.configs):
        table.add_row(rid, *(str(getattr(c, k)) for k in swept))
    console.print(table)
    _print_skipped(console, skipped)
    if not dry.groups:
        console.print("nothing to submit")
        console.print("dry run: nothing submitted")
        return
    n_tasks = len(dry.groups)
    _print_resumed(dry.resumed, dry.todo)
    if plan.options.pack > 1 or any(len(g) > 1 for g in dry.groups):
        most = max(len(g) for g in dry.groups)
        console.print(f"{n_tasks} task(s) of at most {most} run(s) each (packs as submitted):")
        todo = set(dry.todo)
        for i, g in enumerate(dry.groups):  # plain lines, never wrapped: one task per line
            typer.echo(f"  task {i}: {', '.join(r if r in todo else f'{r} (carried)' for r in g)}")
    else:
        console.print(f"{n_tasks} task(s), one run each")
    if dry.sbatch is not None:
        if dry.arrays > 1:
            chained = ""
            if dry.chains < dry.arrays:  # (--max-parallel bounds them all: slurm.array_chains)
                order = (
                    "chained: each starts when the one before it has ended"
                    if dry.chains == 1
                    else f"in {dry.chains} chains: array k starts when array k-{dry.chains} has ended"
                )
                chained = f", {order}, so at most {plan.options.max_parallel} task(s) run at once"
            typer.echo(f"{n_tasks} tasks > MaxArraySize {dry.max_array}: {dry.arrays} arrays{chained}")
        typer.echo(dry.sbatch)
    console.print("dry run: nothing submitted")


def _print_resumed(resumed: list[list[str]], todo: list[str] | None = None) -> None:
    """Which tasks resume from a checkpoint; a checkpointed pack is kept whole whatever --pack says,
    carrying its runs that are not to do (`todo`; None: all are)."""
    if not resumed:
        return
    members = [r for g in resumed for r in g]
    runs = len(members) if todo is None else len(set(members) & set(todo))
    packs = [g for g in resumed if len(g) > 1]
    kept = f"; {len(packs)} pack(s) kept whole as checkpointed, whatever --pack says" if packs else ""
    carried = len(members) - runs
    if carried:
        kept += f", carrying {carried} run(s) done or training elsewhere (trained along, not written)"
    typer.echo(f"  {runs} run(s) resume from their checkpoints{kept}")  # plain: never wrapped


def _run_counts(states: list[str], accuracies: list[float | None]) -> str:
    """`3 completed, 1 failed, 2 running, best 91.23%`: runs by state (completed and failed always
    shown), and the best test accuracy so far. Shared by a local sweep's bar and `status`."""
    from collections import Counter

    counts = Counter(str(s).lower() for s in states)
    parts = [f"{counts.pop('completed', 0)} completed", f"{counts.pop('failed', 0)} failed"]
    parts += [f"{n} {state}" for state, n in sorted(counts.items())]
    best = max((a for a in accuracies if a is not None), default=None)
    return ", ".join(parts) + (f", best {best:.2f}%" if best is not None else "")


def _run_here(console, plan, tasks, groups) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .claims import read_progress
    from .job import COMPLETED_ELSEWHERE, RUNNING_ELSEWHERE
    from .launch import local_parallel, run_here
    from .sweepdir import resumable_packs, run_states

    parallel = local_parallel(plan.options)
    n_runs = sum(len(g) for g in groups)
    console.print(
        f"running {n_runs} run(s) here, {min(parallel, len(tasks))} at a time; results in {plan.folder}/"
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        # the bar counts runs, not tasks: a pack of 4 is 4 runs
        t = bar.add_task("runs", total=n_runs, counts=_run_counts([], []))
        elsewhere: list[str] = []
        outcome: dict[str, tuple[str, float | None]] = {}  # run id -> (state, test accuracy)

        rows: dict[int, Any] = {}  # running task -> its own row under the runs bar
        shown_at = [0.0]

        def on_event(what: str, i: int, obj: Any) -> None:
            if what == "started":
                first = groups[i][0]
                label = first if len(groups[i]) == 1 else f"{first} +{len(groups[i]) - 1}"
                rows[i] = bar.add_task(f"  {label}", total=None, counts="starting")
                return
            if what == "tick":  # how far each running task has got (its progress note, claims.py)
                if time.monotonic() - shown_at[0] >= 0.5:
                    shown_at[0] = time.monotonic()
                    for j, row in rows.items():
                        if note := read_progress(plan.folder, groups[j][0]):
                            loss, acc = note.get("train_loss"), note.get("test_accuracy")
                            said = [f"loss {loss:.4f}"] if isinstance(loss, (int, float)) else []
                            said += [f"acc {acc:.2f}%"] if isinstance(acc, (int, float)) else []
                            total = note.get("iters")
                            bar.update(row, total=total, completed=note["iteration"], counts="  ".join(said))
                return
            if what != "finished":
                return
            if i in rows:
                bar.remove_task(rows.pop(i))
            said: dict[str, str] = {}  # what the task says it did with each run
            with contextlib.suppress(Exception):  # (a failed job has no output)
                said = {o["run_id"]: o["status"] for o in obj.results()[0]}
            # a job stopped by a signal of its own (a stray SIGTERM) left its runs a checkpoint
            resumable = {r for t in resumable_packs(plan.folder, groups[i]) for r in t}
            for rid in groups[i]:
                if said.get(rid) == RUNNING_ELSEWHERE:
                    elsewhere.append(rid)
                    outcome[rid] = ("elsewhere", None)
                    bar.console.print(f"  {rid}: being trained by another process, not here")
                    continue
                _, data = _result(plan.folder, rid)
                acc = data["metrics"].get("test_accuracy") if data else None
                status = data["status"] if data else ("stopped" if rid in resumable else "missing")
                outcome[rid] = (status if status in ("completed", "failed", "stopped") else "failed", acc)
                if said.get(rid) == COMPLETED_ELSEWHERE:
                    bar.console.print(f"  {rid}: completed meanwhile by another process")
                    continue
                if status == "stopped":
                    bar.console.print(f"  {rid}: stopped with a checkpoint (the same sweep again resumes it)")
                    continue
                bar.console.print(f"  {rid}: {status}" + (f"  {acc:.2f}%" if acc is not None else ""))
            states, accs = zip(*outcome.values())
            bar.update(t, completed=len(outcome), counts=_run_counts(list(states), list(accs)))

        try:
            states = run_here(plan, tasks, groups, on_event)
        except KeyboardInterrupt:  # Ctrl-C: the jobs checkpointed and stopped (local.run_local)
            bar.stop()
            console.print("interrupted")
            _print_resumable(run_states(plan.folder))
            raise typer.Exit(130) from None
    stopped = [r for r, (state, _) in outcome.items() if state == "stopped"]
    failed = sum(s != "COMPLETED" and not set(g) <= set(stopped) for s, g in zip(states, groups))
    # a task can complete with a failed run in it (a pack where one model diverged)
    failed_runs = [r for g in groups for r in g if (_result(plan.folder, r)[0] or "failed") == "failed"]
    failed_runs = [r for r in failed_runs if r not in elsewhere and r not in stopped]
    console.print(
        f"done: {len(states) - failed - sum(set(g) <= set(stopped) for g in groups)} task(s) completed, "
        f"{failed} failed"
        + (f"; {len(failed_runs)} run(s) failed" if failed_runs else "")
        + (
            f"; {len(stopped)} run(s) stopped with a checkpoint (the same sweep again resumes them)"
            if stopped
            else ""
        )
        + (f"; {len(elsewhere)} run(s) left to the process already training them" if elsewhere else "")
    )
    if failed or failed_runs or stopped:
        raise typer.Exit(1)


def _result(folder: Path, run_id: str):
    from .claims import result_status

    return result_status(folder, run_id)


def _follow(console, folder: Path, interval_s: float = 2.0) -> list[dict[str, Any]]:
    """A live table of the sweep's runs until every one has ended; their final rows."""
    from rich.console import Group
    from rich.live import Live

    from .sweepdir import run_states

    try:
        with Live(console=console, refresh_per_second=2) as live:
            while True:
                rows = run_states(folder)
                live.update(Group(_status_table(folder.name, rows), _runs_bar(rows)))
                if all(r["state"].done for r in rows):
                    break
                time.sleep(interval_s)
    except KeyboardInterrupt:  # Ctrl-C stops the following, not the jobs
        typer.echo(
            f"stopped following {folder.name}: its jobs go on (`mnist-jobs status {folder.name}`; "
            f"`mnist-jobs cancel {folder.name}` stops them)"
        )
        raise typer.Exit(130) from None
    if not console.is_terminal:
        console.line()  # (Live ends a file's last render without one)
    _print_resumable(rows)
    return rows


def _print_resumable(rows: list[dict[str, Any]]) -> None:
    if resumable := sum(bool(r.get("resumable")) for r in rows):
        typer.echo(
            f"{resumable} run(s) stopped with a checkpoint: the same `mnist-jobs sweep` (or `train`) "
            "again resumes them"
        )


def _runs_bar(rows: list[dict[str, Any]]):
    """`runs ━━━━━━━━━━━━━━━━━━━━━━━━━━ 3/4 2 completed, 1 failed, 1 running, best 91.23%`: the runs
    done (completed, failed, or missing) out of all, one per run whatever packs they trained in."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    done = sum(r["state"].done for r in rows)
    line = Table.grid(padding=(0, 1))
    line.add_row(
        "runs",
        ProgressBar(total=max(1, len(rows)), completed=done, width=40),
        f"{done}/{len(rows)}",
        _run_counts([r["state"] for r in rows], [r["test_accuracy"] for r in rows]),
    )
    return line


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
    history = any(r.get("history") for r in rows)  # earlier attempts: node failure, requeue
    if history:
        table.add_column("earlier attempts")

    def why(r: dict[str, Any]) -> str:  # a failed run's error, first line (`logs` has the rest)
        return (str(r.get("error") or "").splitlines() or [""])[0][:80] if r["state"] == "FAILED" else ""

    progress = any(r.get("progress") for r in rows)  # how far the running ones are
    if progress:
        table.add_column("progress", justify="right")
    errors = any(why(r) for r in rows)
    if errors:
        table.add_column("error")
    for r in rows:
        acc = f"{r['test_accuracy']:.2f}" if r["test_accuracy"] is not None else ""
        c = colours.get(r["state"], "white")
        table.add_row(
            r["run_id"],
            *(str(r["config"].get(k)) for k in varying),
            r["job_id"] or "",
            f"[{c}]{r['state']}[/]",
            acc,
            *([r.get("history") or ""] if history else []),
            *([_progress_text(r.get("progress"))] if progress else []),
            *([why(r)] if errors else []),
        )
    return table


def _progress_text(note: dict[str, Any] | None) -> str:
    """`1200/3000 (40%), acc 87.12%`: a running run's progress note (claims.read_progress), or ''."""
    if not note:
        return ""
    it, total = note.get("iteration"), note.get("iters")
    text = f"{it}/{total} ({100 * it / total:.0f}%)" if isinstance(total, int) and total > 0 else f"{it}"
    acc = note.get("test_accuracy")
    return text + (f", acc {acc:.2f}%" if isinstance(acc, (int, float)) else "")


def _complete_sweep_name(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of a sweep name: the sweep folders under --results-dir (as typed earlier on the
    line, else results/). One directory listing; nothing heavy is imported."""
    from .sweepdir import list_sweeps

    results_dir = Path(ctx.params.get("results_dir") or "results")
    with contextlib.suppress(OSError):
        return [p.name for p in list_sweeps(results_dir) if p.name.startswith(incomplete)]
    return []


SweepName = Annotated[
    Optional[str],
    typer.Argument(help="Sweep name (folder under --results-dir).", autocompletion=_complete_sweep_name),
]
RequiredSweepName = Annotated[
    str, typer.Argument(help="Sweep name.", autocompletion=_complete_sweep_name, show_default=False)
]


def _sweep_folder(name: str, results_dir: Path) -> Path:
    from .sweepdir import MANIFEST, manifest_path

    folder = results_dir / name
    if not manifest_path(folder).exists():
        fail(f"no sweep named {name!r} under {results_dir} (no {folder}/{MANIFEST})")
    return folder


@app.command()
def status(
    name: SweepName = None,
    results_dir: ResultsDir = Path("results"),
    watch: Annotated[
        bool,
        typer.Option("--watch", "--wait", help="Refresh until every run is done (a bar counts the runs)."),
    ] = False,
) -> None:
    """Show the state of each run of a sweep (pending, running, completed, failed), or list sweeps."""
    from rich.console import Console
    from rich.table import Table

    from .sweepdir import ManifestError, list_sweeps, read_manifest, run_states

    console = Console()
    if name is None:
        if not results_dir.is_dir():  # (a mistyped --results-dir is not an empty list of sweeps)
            fail(f"no folder {results_dir}: no sweeps there (--results-dir names where they are)")
        table = Table(title=f"sweeps under {results_dir}")
        for col in ("name", "executor", "runs", "completed", "failed", "updated"):
            table.add_column(col)
        for folder in list_sweeps(results_dir):
            try:
                m = read_manifest(folder) or {}
                rows = run_states(folder)
            except ManifestError as e:  # one bad folder does not hide the others
                table.add_row(folder.name, "[red]unreadable[/]", "", "", "", str(e))
                continue
            table.add_row(
                folder.name,
                "+".join(sorted({r["executor"] or "?" for r in rows})) or m.get("executor", "?"),
                str(len(rows)),
                str(sum(r["state"] == "COMPLETED" for r in rows)),
                str(sum(r["state"] == "FAILED" for r in rows)),
                m.get("updated_at", ""),
            )
        console.print(table)
        return
    folder = _sweep_folder(name, results_dir)
    try:
        if watch:
            _follow(console, folder)
        else:
            rows = run_states(folder)
            console.print(_status_table(name, rows))
            console.print(_runs_bar(rows))
            _print_resumable(rows)
    except ManifestError as e:
        fail(str(e))


@app.command()
def logs(
    name: RequiredSweepName,
    run: Annotated[
        Optional[str], typer.Argument(help="Run id (or a unique prefix); default: the only/first run.")
    ] = None,
    results_dir: ResultsDir = Path("results"),
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output until the job ends.")
    ] = False,
    task: Annotated[
        int, typer.Option("--task", min=0, help="The job's task whose output to print (a DDP rank).")
    ] = 0,
) -> None:
    """Print a run's stdout and stderr (from its SLURM/local job)."""
    from .sweepdir import ManifestError, RunState, load_manifest, log_paths, run_states

    folder = _sweep_folder(name, results_dir)
    try:
        manifest = load_manifest(folder)
    except ManifestError as e:
        fail(str(e))
    ids = list(manifest["runs"])
    match = [r for r in ids if run is None or r.startswith(run)]
    if not match:
        fail(f"no run {run!r} in sweep {name!r} (runs: {', '.join(ids[:5])}{'…' if len(ids) > 5 else ''})")
    if run is not None and run not in match and len(match) > 1:
        some = ", ".join(match[:5]) + ("…" if len(match) > 5 else "")
        fail(f"{run!r} is the start of {len(match)} runs of sweep {name!r} ({some}): give more of it")
    run_id = run if run in match else match[0]
    job_id = manifest["runs"][run_id].get("job_id")
    if not job_id:
        fail(f"run {run_id} has no job id yet (local runs keep logs under {folder}/logs)")
    out, err = log_paths(folder, job_id, task)
    printed = False
    positions = {out: 0, err: 0}
    while True:
        for path, label in ((out, "stdout"), (err, "stderr")):
            if path.exists():
                with open(path, errors="replace") as f:
                    f.seek(positions[path])
                    text = f.read()
                    positions[path] = f.tell()
                if text:
                    printed = True
                    typer.echo(f"==> {label}: {path} <==" if not follow else text, nl=not follow)
                    if not follow:
                        typer.echo(text)
        if not follow:
            if not out.exists() and not err.exists():
                typer.echo(f"no log yet for {run_id} (job {job_id}, task {task}): expected {out}")
            elif not printed:  # (a job killed before its first line: a failing --setup, say)
                typer.echo(f"the logs of {run_id} (job {job_id}, task {task}) are empty: {out}, {err.name}")
            return
        state = next((r["state"] for r in run_states(folder) if r["run_id"] == run_id), RunState.MISSING)
        if RunState(state).done:
            return
        time.sleep(1.0)


@app.command()
def cancel(
    name: RequiredSweepName,
    results_dir: ResultsDir = Path("results"),
) -> None:
    """Cancel every run of a sweep that is still queued or running.

    SLURM jobs are cancelled with scancel; local jobs on this machine get SIGTERM, so each run
    checkpoints and stops, and the same sweep again resumes it."""
    from .launch import LaunchError, cancel_sweep
    from .sweepdir import ManifestError

    folder = _sweep_folder(name, results_dir)
    try:
        done = cancel_sweep(folder)
    except (ManifestError, LaunchError) as e:
        fail(str(e))
    if not (done.slurm or done.local or done.elsewhere or done.unreachable or done.sweeps):
        typer.echo(f"nothing to cancel in {name}")
        return
    if done.sweeps:
        typer.echo(f"interrupted the sweep process(es) {', '.join(done.sweeps)} here: no more runs start")
    if done.slurm:
        typer.echo(f"cancelled {len(done.slurm)} job(s): {', '.join(done.slurm)}")
    if done.local:
        typer.echo(
            f"stopped {len(done.local)} local job(s): {', '.join(done.local)} (they checkpoint first: "
            "the same `mnist-jobs sweep` again resumes them)"
        )
    for run_id, host in done.elsewhere.items():
        typer.echo(f"{run_id} trains on {host}, not here: run `mnist-jobs cancel {name}` there")
    if done.unreachable:
        typer.echo(f"no local job {', '.join(done.unreachable)} on this machine any more: nothing to stop")


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
            help="table, csv, json or markdown (plain data on stdout, fixed columns), or html (one self-contained page on stdout: the table and the plot embedded).",
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
        "html": rep.to_html,
    }
    if fmt not in formats:
        fail(f"--format must be table, csv, json, markdown or html (got {fmt!r})")
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
    if result.no_match and to_text is not None:
        typer.echo(f"Warning: {result.no_match}", err=True)  # (stdout keeps the empty table's header)
    if to_text is not None:
        sys.stdout.write(to_text(result))
        return
    import os

    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)  # piped into a file or a pager: do not squeeze into 80 columns
    if result.no_match:
        console.print(result.no_match[0].upper() + result.no_match[1:], highlight=False)
        return
    if not result.rows and not result.other_rows:
        console.print(f"No results to show under {path}. {rep.footer(result)}", highlight=False)
        return
    console.print(rep.build_table(result))
