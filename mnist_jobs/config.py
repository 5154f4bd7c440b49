"""Configuration: frozen, keyword-only dataclasses with validation. No torch here.

Every option value from the command line arrives as text and goes through `parse_option`, so `train`
(one value per option) and `sweep` (comma lists) share one parser and one set of error messages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
import unicodedata
from dataclasses import dataclass, field
from typing import Any

MODELS = ("logreg", "cnn")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "onecycle")  # the lr over a run: see schedule.py
ONECYCLE_WARMUP = 0.3  # onecycle's default --warmup (torch's OneCycleLR pct_start)
TRAIN_SIZE = 60_000
TEST_SIZE = 10_000
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MAX_HYPERPARAM = 1e30  # lr, weight decay: float32 optimizers overflow far above this


class ConfigError(ValueError):
    """A bad option value. The message names the option and the value."""


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _added(default: Any, before: Any | None = None) -> Any:
    """A TrainConfig field added after run ids were first handed out: at `before` (what every run
    before it did; default: `default`) it is left out of `config_id`, so earlier runs, sweeps and
    checkpoints keep their ids, and a record without it reads as `before`."""
    return field(default=default, metadata={"added": True, "before": default if before is None else before})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that determines one training run (and so its result)."""

    model: str = "logreg"
    optimizer: str = "sgd"
    lr: float = 0.001
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = _added("constant")  # lr multiplied by schedule.lr_scale(config, step)
    warmup: float | None = _added(None, before=0.0)  # a fraction of iters; resolved: always set
    normalize: bool = _added(False)  # inputs (x - MNIST_MEAN) / MNIST_STD (data.load)
    deskew: bool = _added(False)  # inputs slant-normalised first (data.deskew_images)
    batch_size: int = 100
    epochs: int | None = None
    iters: int | None = None  # resolved: always set after construction
    seed: int = 0
    eval_every: int = 500
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("model", self.model, MODELS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_number("lr", self.lr, float, minimum=0.0, strict=True, maximum=MAX_HYPERPARAM)
        _check_number("momentum", self.momentum, float, minimum=-math.inf)  # a finite number
        if not 0.0 <= self.momentum < 1.0:  # momentum >= 1 never forgets a gradient: SGD diverges
            raise ConfigError(f"--momentum must be >= 0 and < 1 (got {self.momentum!r})")
        if self.optimizer == "adam" and self.momentum:  # it would change the run id, not the run
            raise ConfigError(
                f"--momentum {self.momentum:g} has no effect with --optimizer adam (its betas are "
                "0.9, 0.999): sweep momentum with sgd only"
            )
        _check_number("weight_decay", self.weight_decay, float, minimum=0.0, maximum=MAX_HYPERPARAM)
        _check_choice("schedule", self.schedule, SCHEDULES)
        if self.warmup is None:
            object.__setattr__(self, "warmup", ONECYCLE_WARMUP if self.schedule == "onecycle" else 0.0)
        _check_number("warmup", self.warmup, float, minimum=0.0)
        object.__setattr__(self, "warmup", float(self.warmup))
        if not self.warmup < 1.0:
            raise ConfigError(f"--warmup is a fraction of the iterations: >= 0 and < 1 (got {self.warmup!r})")
        for name in ("normalize", "deskew"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{option_name(name)} must be on or off (got {getattr(self, name)!r})")
        _check_number("batch_size", self.batch_size, int, minimum=1, maximum=TRAIN_SIZE)
        _check_number("seed", self.seed, int, minimum=0, maximum=2**64 - 1)  # torch's seed range
        _check_number("eval_every", self.eval_every, int, minimum=1)
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps (got {self.device!r})")
        both = self.epochs is not None and self.iters is not None
        if both and self.iters != self.epochs * self.iters_per_epoch:  # (a resolved dict round-trips)
            raise ConfigError("give --epochs or --iters, not both")
        if self.epochs is not None:
            _check_number("epochs", self.epochs, int, minimum=1)
            object.__setattr__(self, "iters", self.epochs * self.iters_per_epoch)
        elif self.iters is None:
            object.__setattr__(self, "iters", 3000)  # the tutorial's n_iters (5 epochs of batch 100)
        _check_number("iters", self.iters, int, minimum=1)

    @property
    def iters_per_epoch(self) -> int:
        return math.ceil(TRAIN_SIZE / self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def config_id(self) -> str:
        """A short stable hash of the resolved config: the same config is the same run."""
        d = self.to_dict()
        d.pop("epochs")  # resolved into iters
        for name, before in ADDED_BEFORE.items():  # options added later, at what runs did before them
            if d[name] == before:
                del d[name]
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{option_name(name)} must be one of {', '.join(choices)} (got {value!r})")


def _check_number(
    name: str, value: Any, kind: type, *, minimum: float, strict: bool = False, maximum: float | None = None
) -> None:
    ok_type = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{option_name(name)} must be a number (got {value!r})")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{option_name(name)} must be finite (got {value!r})")
    if (strict and value <= minimum) or value < minimum:
        relation = ">" if strict else ">="
        raise ConfigError(f"{option_name(name)} must be {relation} {minimum:g} (got {value!r})")
    if maximum is not None and value > maximum:
        limit = f"{maximum:g}" if isinstance(maximum, float) else maximum
        raise ConfigError(f"{option_name(name)} must be <= {limit} (got {value!r})")


# ---- parsing option text ------------------------------------------------------------------------


def _field_kind(hint: Any) -> type:
    """str, int, float or bool from a field's annotation (`int | None` is int)."""
    kinds = [a for a in typing.get_args(hint) if a is not type(None)]
    return kinds[0] if kinds else hint


# Every TrainConfig field is a training option (CLI, sweeps, TOML), typed by its annotation.
_HINTS = typing.get_type_hints(TrainConfig)
_FIELD_TYPES: dict[str, type] = {f.name: _field_kind(_HINTS[f.name]) for f in dataclasses.fields(TrainConfig)}
TRAIN_FIELDS = tuple(_FIELD_TYPES)
# Options added after the first run ids, and what a run did before each (see `_added`): left out of
# config_id there; a record without one reads as that value (report.flatten).
ADDED_BEFORE: dict[str, Any] = {
    f.name: f.metadata["before"] for f in dataclasses.fields(TrainConfig) if f.metadata.get("added")
}
_TRUE, _FALSE = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def parse_scalar(name: str, text: Any) -> Any:
    """Convert one value (text from the CLI or a TOML scalar) to the field's type."""
    kind = _FIELD_TYPES[name]
    if kind is bool:  # on/off (true/false, yes/no, 1/0; a TOML boolean)
        if isinstance(text, bool):
            return text
        word = str(text).strip().lower()
        if word in _TRUE + _FALSE:
            return word in _TRUE
        raise ConfigError(f"{option_name(name)} must be on or off (got {str(text).strip()!r})")
    if kind is str:
        value = str(text).strip()
        return value.lower() if name != "device" else value
    if isinstance(text, bool):
        raise ConfigError(f"{option_name(name)} must be a number (got {text!r})")
    if isinstance(text, (int, float)):
        if kind is int and (isinstance(text, float) and not text.is_integer()):
            raise ConfigError(f"{option_name(name)} must be an integer (got {text!r})")
        return kind(text)
    s = str(text).strip()
    try:
        if kind is int:
            f = float(s)
            if not f.is_integer():
                raise ValueError
            return int(f)
        return float(s)
    except (ValueError, OverflowError):
        what = "an integer" if kind is int else "a number"
        hint, opt = "", option_name(name)
        if s.lower().startswith(("uniform:", "loguniform:")):  # a random search's distribution
            hint = f"; a distribution is for a random search: mnist-jobs sweep {opt} {s} --samples N"
        raise ConfigError(f"{opt} must be {what} (got {s!r}){hint}") from None


def parse_option(name: str, text: Any) -> list[Any]:
    """Parse a comma list (or a TOML list) into typed, de-duplicated values, keeping order."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = str(text).split(",")
    if not items or any(isinstance(i, str) and not i.strip() for i in items):
        raise ConfigError(f"{option_name(name)} has an empty value (got {text!r})")
    values: list[Any] = []
    for item in items:
        v = parse_scalar(name, item)
        if v not in values:
            values.append(v)
    return values


def train_config_from_options(options: dict[str, Any]) -> TrainConfig:
    """Build one TrainConfig from option text (None = default); a list is an error here."""
    kwargs: dict[str, Any] = {}
    for name, text in options.items():
        if text is None:
            continue
        values = parse_option(name, text)
        if len(values) > 1:
            raise ConfigError(
                f"{option_name(name)} takes one value in `train` (got {text!r}); "
                "use `mnist-jobs sweep` for a grid"
            )
        kwargs[name] = values[0]
    return TrainConfig(**kwargs)


# ---- SLURM / launch parameters -----------------------------------------------------------------


def _sbatch(name: str, convert: Any = None) -> dict[str, Any]:
    """A SlurmConfig field's metadata: the submitit SlurmExecutor parameter it sets, and how its value
    becomes that parameter's (None: left out)."""
    return {"submitit": name, "convert": convert}


def _mem(mem_gb: float | None) -> str | None:
    """sbatch --mem with a unit (a bare number would mean megabytes)."""
    if mem_gb is None:
        return None
    return f"{int(mem_gb)}G" if float(mem_gb).is_integer() else f"{round(mem_gb * 1024)}M"


@dataclass(frozen=True, kw_only=True)
class SlurmConfig:
    """sbatch resources for one job (or each task of an array).

    Each field names the submitit parameter it sets (`submitit_parameters`), so adding a SLURM option
    is one field here and its option in cli.py's SLURM option table: the TOML [slurm] table, the
    executor decision and the sbatch script follow from the field list."""

    partition: str | None = field(default=None, metadata=_sbatch("partition"))
    nodes: int = field(default=1, metadata=_sbatch("nodes"))
    tasks_per_node: int = field(default=1, metadata=_sbatch("ntasks_per_node"))
    gpus_per_node: int = field(default=0, metadata=_sbatch("gpus_per_node", lambda n: n or None))
    cpus_per_task: int = field(default=1, metadata=_sbatch("cpus_per_task"))
    mem_gb: float | None = field(default=None, metadata=_sbatch("mem", _mem))
    time_min: int = field(default=60, metadata=_sbatch("time"))
    account: str | None = field(default=None, metadata=_sbatch("account"))
    qos: str | None = field(default=None, metadata=_sbatch("qos"))
    constraint: str | None = field(default=None, metadata=_sbatch("constraint"))
    exclusive: bool = field(default=False, metadata=_sbatch("exclusive", lambda x: True if x else None))
    slurm_opts: tuple[tuple[str, str], ...] = field(
        default_factory=tuple, metadata=_sbatch("additional_parameters", lambda o: dict(o) or None)
    )
    setup: tuple[str, ...] = field(
        default_factory=tuple, metadata=_sbatch("setup", lambda s: list(s) or None)
    )

    def submitit_parameters(self) -> dict[str, Any]:
        """The SlurmExecutor parameters these fields set (the ones left at "nothing" left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            convert = f.metadata.get("convert")
            value = convert(value) if convert else value
            if value is not None:
                out[f.metadata["submitit"]] = value
        return out

    def __post_init__(self) -> None:
        _check_number("nodes", self.nodes, int, minimum=1)
        _check_number("tasks_per_node", self.tasks_per_node, int, minimum=1)
        _check_number("gpus_per_node", self.gpus_per_node, int, minimum=0)
        _check_number("cpus_per_task", self.cpus_per_task, int, minimum=1)
        _check_number("time_min", self.time_min, int, minimum=1)
        if self.mem_gb is not None:
            _check_number("mem_gb", self.mem_gb, float, minimum=0.0, strict=True)
        for name in ("partition", "account", "qos", "constraint"):
            value = getattr(self, name)
            if value is not None:
                _check_sbatch_word(option_name(name), value)
        if not isinstance(self.exclusive, bool):
            raise ConfigError(f"--exclusive must be true or false (got {self.exclusive!r})")
        for pair in self.slurm_opts:
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise ConfigError(f"--slurm-opt must be KEY=VALUE (got {pair!r})")
            key, value = pair
            check_no_control("--slurm-opt", f"{key}={value}")
            if not _SLURM_KEY_RE.fullmatch(key):
                raise ConfigError(f"--slurm-opt key must look like 'mail-type' (got {key!r})")
            if (owner := _OWNED_SBATCH_KEYS.get(key)) is not None:
                raise ConfigError(f"--slurm-opt {key}={value}: {owner}")
        for line in self.setup:
            if not isinstance(line, str):
                raise ConfigError(f"--setup must be a line of shell (got {line!r})")
            check_no_control("--setup", line)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["slurm_opts"] = dict(self.slurm_opts)
        d["setup"] = list(self.setup)
        return d


def parse_slurm_opt(text: str) -> tuple[str, str]:
    if not isinstance(text, str):  # a TOML [slurm] table can hold anything
        raise ConfigError(f"--slurm-opt must be KEY=VALUE (got {text!r})")
    check_no_control("--slurm-opt", text)
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"--slurm-opt must be KEY=VALUE (got {text!r})")
    return key.replace("_", "-"), value.strip()


# ---- text that reaches the sbatch script -------------------------------------------------------

_SLURM_KEY_RE = re.compile(r"[a-z][a-z0-9_-]*")

# sbatch options the launcher writes itself: one given again through --slurm-opt would make a second
# #SBATCH line (sbatch takes the last), escape the checks made on the real option, or break the job
_REAL_OPTION = {
    "partition": "--partition", "nodes": "--nodes", "ntasks-per-node": "--tasks-per-node",
    "ntasks": "--nodes and --tasks-per-node", "gpus-per-node": "--gpus-per-node", "gpus": "--gpus-per-node",
    "cpus-per-task": "--cpus-per-task", "mem": "--mem-gb", "time": "--time-min", "account": "--account",
    "qos": "--qos", "constraint": "--constraint", "exclusive": "--exclusive", "job-name": "--name",
}  # fmt: skip
_LOGS = "the job's logs go to the sweep folder's logs/ (mnist-jobs logs prints them)"
_OWNED_SBATCH_KEYS = {
    **{key: f"use {option} instead" for key, option in _REAL_OPTION.items()},
    "array": "the job array is the sweep's own (--max-parallel limits how many run at once)",
    "signal": "the time-limit signal is set from --time-min (USR2, a minute before the end)",
    "output": _LOGS,
    "error": _LOGS,
}


def check_no_control(option: str, value: str) -> None:
    """Refuse any control character (Unicode category C: newline, CR, tab, NUL, ESC, ...).

    Every such value is written into the sbatch script: submitit shell-quotes `#SBATCH` values, but a
    newline inside the quotes still starts a line of its own (a second `#SBATCH` option), and `--setup`
    lines are written as they are."""
    for c in value:
        if unicodedata.category(c)[0] == "C":
            raise ConfigError(f"{option} {value!r} contains a control character ({repr(c)[1:-1]})")


def _check_sbatch_word(option: str, value: Any) -> None:
    """A partition, account, QOS or constraint: non-empty text without control characters."""
    if not isinstance(value, str):
        raise ConfigError(f"{option} must be text (got {value!r})")
    if not value:
        raise ConfigError(f"{option} must not be empty (got {value!r})")
    check_no_control(option, value)
