"""Grids: the training options' value lists, TOML sweep files, the cartesian product, run ids.

Runs on the login node (or a laptop). Run ids derive from the config, so running the same sweep again
finds its earlier results.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

import tomllib

from .config import TRAIN_FIELDS, ConfigError, TrainConfig, option_name, parse_option

MAX_GRID = 10_000


def read_sweep_file(path: Path | str) -> dict[str, Any]:
    """A TOML sweep file: lists for swept keys, scalars for the rest (training keys only, plus an
    optional [slurm] table and `name`)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: invalid TOML ({e})") from None
    allowed = [*TRAIN_FIELDS, "name", "slurm"]
    unknown = sorted(k for k in data if k.replace("-", "_") not in allowed)
    if unknown:
        raise ConfigError(
            f"--config {path}: unknown key(s) {', '.join(map(repr, unknown))} (valid: {', '.join(allowed)})"
        )
    return {k.replace("-", "_"): v for k, v in data.items()}


def grid_values(cli: dict[str, Any], file_values: dict[str, Any] | None = None) -> dict[str, list[Any]]:
    """Per training option, its list of values: CLI text overrides file values."""
    values: dict[str, list[Any]] = {}
    for name in TRAIN_FIELDS:
        raw = cli.get(name)
        if raw is None and file_values:
            raw = file_values.get(name)
        if raw is None:
            continue
        if isinstance(raw, list) and not raw:
            raise ConfigError(f"{option_name(name)} is an empty list")
        values[name] = parse_option(name, raw)
    return values


def expand_grid(values: dict[str, list[Any]]) -> list[TrainConfig]:
    """Cartesian product of the option lists, each point validated; duplicates (same run id) removed."""
    names = list(values)
    size = 1
    for name in names:
        size *= len(values[name])
    configs: dict[str, TrainConfig] = {}
    for combo in itertools.product(*(values[n] for n in names)):
        cfg = TrainConfig(**dict(zip(names, combo)))
        configs.setdefault(sweep_run_id(cfg), cfg)
    return list(configs.values())


def grid_size(values: dict[str, list[Any]]) -> int:
    size = 1
    for v in values.values():
        size *= len(v)
    return size


def sweep_run_id(config: TrainConfig) -> str:
    return f"{config.model}-{config.config_id()}"


def default_sweep_name(run_ids: list[str]) -> str:
    return "sweep-" + hashlib.sha256(",".join(sorted(run_ids)).encode()).hexdigest()[:8]
