"""The `mnist-jobs` command line: one command per verb, the docstring is the help.

torch and submitit are imported inside commands, so `mnist-jobs --help` stays instant. Every bad input
ends in one line on stderr, `Error: ...`, and exit code 2.
"""

from __future__ import annotations

import sys
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
        except click_exc.Abort:
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
) -> None:
    """Train one model on MNIST and write its JSON result.

    The defaults reproduce the tutorials' run: logistic regression, SGD lr 0.001, batch 100, 3000 iterations (about 82.5 % test accuracy).
    """
    try:
        config = train_config_from_options(_train_options(locals()))
    except ConfigError as e:
        fail(str(e))
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
