"""Grids: the training options' value lists, sampled (random-search) options, TOML sweep files, the
points they expand to, run ids.

Runs on the login node (or a laptop). Run ids derive from the config, so running the same sweep again
finds its earlier results; sampled points are drawn from the search seed, so the same command draws the
same points, and so has the same run ids.

A sampled option is `KIND:LOW:HIGH` (`--lr loguniform:1e-4:1e-1`, `--momentum uniform:0:0.99`) with
`--samples N` and `--search-seed S`. Each option draws from its own stream, seeded by the search seed and
the option's name, with nothing but `random.Random.random()`, so:

- the same (seed, option, range) gives the same values on every Python and machine;
- adding or removing another sampled option does not change this one's values (unless a point had to
  be skipped as a repeat of an earlier one);
- `--samples 30` draws the same first 20 points as `--samples 20` (the rest of a sweep resumes).

The N sampled points are crossed with the listed values (`--seed 0,1,2`: each point with each seed).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from .config import TRAIN_FIELDS, ConfigError, TrainConfig, option_name, parse_option

MAX_GRID = 10_000
MAX_SAMPLES = 100_000  # even with --yes: the points are drawn and checked before anything runs
DISTRIBUTIONS = ("uniform", "loguniform")
SAMPLED_FLOATS = ("lr", "momentum", "weight_decay", "warmup")
SAMPLED_INTS = ("batch_size", "epochs", "iters")  # integers drawn in [LOW, HIGH], both included
SIGNIFICANT_DIGITS = 3
SEARCH_KEYS = ("samples", "search_seed")  # sweep-file keys beside the training options
_SPEC_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:(.*)$", re.DOTALL)


@dataclass(frozen=True, kw_only=True)
class Distribution:
    """One sampled training option: values drawn in [low, high], uniformly (`uniform`) or uniformly in
    log space (`loguniform`). Both ends must be valid values of the option, so every draw is.

    Floats are rounded for readable run ids and tables: a uniform draw to 3 significant digits of the
    range's width (uniform:0:0.99 gives 0.734), a log-uniform draw to 3 significant digits of itself
    (0.000234). Integer options (batch size, epochs, iters) draw integers, both ends included."""

    name: str  # the TrainConfig field
    kind: str
    low: float | int
    high: float | int

    def __post_init__(self) -> None:
        opt = option_name(self.name)
        spec = f"{opt} {self.spec()!r}" if self.name in TRAIN_FIELDS else opt
        if self.name not in SAMPLED_FLOATS + SAMPLED_INTS:
            raise ConfigError(_not_sampled(self.name))
        if self.kind not in DISTRIBUTIONS:
            raise ConfigError(
                f"{spec}: unknown distribution {self.kind!r} (valid: {', '.join(DISTRIBUTIONS)})"
            )
        is_int = self.name in SAMPLED_INTS
        for end in (self.low, self.high):
            if isinstance(end, bool) or not isinstance(end, (int, float)):
                raise ConfigError(f"{spec}: LOW and HIGH must be numbers (got {end!r})")
            if not math.isfinite(end):
                raise ConfigError(f"{spec}: LOW and HIGH must be finite (got {end!r})")
            if is_int and not float(end).is_integer():
                raise ConfigError(f"{spec}: {opt} is an integer, so LOW and HIGH must be (got {end!r})")
        if not self.low < self.high:
            raise ConfigError(f"{spec}: LOW must be below HIGH (got {self.low!r} and {self.high!r})")
        if self.kind == "loguniform" and self.low <= 0:
            raise ConfigError(f"{spec}: loguniform needs LOW > 0 (got {self.low!r})")
        for end in (self.low, self.high):
            try:
                TrainConfig(**{self.name: int(end) if is_int else float(end)})
            except ConfigError as e:
                raise ConfigError(f"{spec}: {e}") from None

    def spec(self) -> str:
        """The option's text, `loguniform:0.0001:0.1` (whole numbers without `.0`)."""
        return f"{self.kind}:{_number(self.low)}:{_number(self.high)}"

    def draw(self, u: float) -> float | int:
        """The value for one uniform number u in [0, 1)."""
        lo, hi = self.low, self.high
        if self.name in SAMPLED_INTS:
            lo, hi = int(lo), int(hi)
            if self.kind == "uniform":
                return lo + min(int(u * (hi - lo + 1)), hi - lo)
            value = math.floor(math.exp(math.log(lo) + u * (math.log(hi + 1) - math.log(lo))))
            return min(max(value, lo), hi)
        if self.kind == "uniform":
            x = lo + u * (hi - lo)
            digits = SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(hi - lo))
            x = round(x, digits)
        else:
            x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
            x = float(f"{x:.{SIGNIFICANT_DIGITS}g}")
        return float(min(max(x, lo), hi)) + 0.0  # (+ 0.0: never -0.0)

    def stream(self, seed: int) -> random.Random:
        """This option's own random stream for the search seed (a str seed is hashed with SHA-512, the
        same on every Python 3; only `random()` is drawn from it, whose sequence Python keeps)."""
        return random.Random(f"mnist-jobs/search/{seed}/{self.name}")

    def values(self, n: int, seed: int) -> list[float | int]:
        """The first n draws of this option's stream for the search seed."""
        rng = self.stream(seed)
        return [self.draw(rng.random()) for _ in range(n)]


@dataclass(frozen=True, kw_only=True)
class Search:
    """Random search: `samples` points drawn from the distributions (one stream each, from `seed`)."""

    space: tuple[Distribution, ...]
    samples: int
    seed: int = 0

    def __post_init__(self) -> None:
        for key, value, top in (
            ("samples", self.samples, MAX_SAMPLES),
            ("search_seed", self.seed, 2**64 - 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{option_name(key)} must be an integer (got {value!r})")
            low = 1 if key == "samples" else 0
            if not low <= value <= top:
                raise ConfigError(f"{option_name(key)} must be >= {low} and <= {top} (got {value!r})")
        if not self.space:
            raise ConfigError("a random search needs a sampled option, e.g. --lr loguniform:1e-4:1e-1")
        names = [d.name for d in self.space]
        if len(set(names)) != len(names):
            raise ConfigError(f"an option is sampled twice ({', '.join(map(option_name, names))})")

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.space]

    def points(self) -> list[dict[str, Any]]:
        """The sampled points in draw order, {option: value} each, all different: a draw that repeats
        an earlier point (rounding makes that possible) is skipped, so N samples are N runs. A small
        integer range may hold fewer points than asked for: then it gives what it has."""
        streams = [(d, d.stream(self.seed)) for d in self.space]
        seen: set[tuple[Any, ...]] = set()
        out: list[dict[str, Any]] = []
        for _ in range(10 * self.samples + 100):
            point = {d.name: d.draw(rng.random()) for d, rng in streams}
            key = tuple(point.values())
            if key not in seen:
                seen.add(key)
                out.append(point)
                if len(out) == self.samples:
                    break
        return out

    def describe(self) -> str:
        space = ", ".join(f"{option_name(d.name)} {d.spec()}" for d in self.space)
        return f"{self.samples} point(s) drawn with search seed {self.seed} from {space}"


def _number(x: Any) -> str:
    whole = isinstance(x, float) and x.is_integer() and abs(x) < 1e16
    return str(int(x)) if whole else repr(x)


def _not_sampled(name: str) -> str:
    opt = option_name(name)
    if name in ("seed", "eval_every"):
        why = "seeds are listed, not drawn: --seed 0,1,2" if name == "seed" else "it changes no result"
        sampled = ", ".join(map(option_name, SAMPLED_FLOATS + SAMPLED_INTS))
        return f"{opt} cannot be sampled ({why}); the options that can: {sampled}"
    return f"{opt} takes a name or a comma list of names, not a distribution"


def parse_distribution(name: str, raw: Any) -> Distribution | None:
    """`KIND:LOW:HIGH` (CLI text or a TOML string) as a Distribution; None when `raw` is no distribution
    (a value or a list of values). A distribution inside a list, or a malformed one, is an error."""
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
    specs = [m for i in items if isinstance(i, str) and (m := _SPEC_RE.match(i))]
    if name not in SAMPLED_FLOATS + SAMPLED_INTS:  # (cuda:0 is a device, not a distribution)
        specs = [m for m in specs if m.group(1).lower() in DISTRIBUTIONS]
    if not specs:
        return None
    opt = option_name(name)
    if isinstance(raw, (list, tuple)) or len(items) > 1:
        raise ConfigError(f"{opt}: a distribution is the whole value, not part of a list (got {raw!r})")
    kind, rest = specs[0].group(1).lower(), specs[0].group(2)
    if name not in SAMPLED_FLOATS + SAMPLED_INTS:
        raise ConfigError(_not_sampled(name))
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{opt} {raw!r}: unknown distribution {kind!r} (valid: {', '.join(DISTRIBUTIONS)})")
    ends = rest.split(":")
    if len(ends) != 2:
        raise ConfigError(f"{opt} {raw!r}: a distribution is {kind}:LOW:HIGH")
    try:
        low, high = (float(e.strip()) for e in ends)
    except ValueError:
        raise ConfigError(f"{opt} {raw!r}: LOW and HIGH must be numbers") from None
    if name in SAMPLED_INTS and all(math.isfinite(x) and x.is_integer() for x in (low, high)):
        low, high = int(low), int(high)
    return Distribution(name=name, kind=kind, low=low, high=high)


def read_sweep_file(path: Path | str) -> dict[str, Any]:
    """A TOML sweep file: lists for swept keys, scalars for the rest (training keys only, plus an
    optional [slurm] table, `name`, and for a random search `samples` and `search_seed`; a sampled
    key's value is a string, `lr = "loguniform:1e-4:1e-1"`)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: invalid TOML ({e})") from None
    allowed = [*TRAIN_FIELDS, *SEARCH_KEYS, "name", "slurm"]
    unknown = sorted(k for k in data if k.replace("-", "_") not in allowed)
    if unknown:
        raise ConfigError(
            f"--config {path}: unknown key(s) {', '.join(map(repr, unknown))} (valid: {', '.join(allowed)})"
        )
    return {k.replace("-", "_"): v for k, v in data.items()}


def sweep_space(
    cli: dict[str, Any],
    file_values: dict[str, Any] | None = None,
    *,
    samples: Any = None,
    search_seed: Any = None,
) -> tuple[dict[str, list[Any]], Search | None]:
    """Per training option its list of values, and the random search (None: a plain grid). CLI values
    (None: not given) override the file's, option by option; so do --samples and --search-seed."""
    file_values = dict(file_values or {})
    # --iters and --epochs are two ways of saying one thing: the command line's overrides the file's
    # either way (a file's `epochs = 5` with --iters 200 for a quick try)
    for given, other in (("iters", "epochs"), ("epochs", "iters")):
        if cli.get(given) is not None and cli.get(other) is None:
            file_values.pop(other, None)
    values: dict[str, list[Any]] = {}
    space: list[Distribution] = []
    for name in TRAIN_FIELDS:
        raw = cli.get(name)
        if raw is None:
            raw = file_values.get(name)
        if raw is None:
            continue
        if isinstance(raw, list) and not raw:
            raise ConfigError(f"{option_name(name)} is an empty list")
        dist = parse_distribution(name, raw)
        if dist is not None:
            space.append(dist)
        else:
            values[name] = parse_option(name, raw)
    samples = samples if samples is not None else file_values.get("samples")
    search_seed = search_seed if search_seed is not None else file_values.get("search_seed")
    if not space:
        for key, given in (("samples", samples), ("search_seed", search_seed)):
            if given is not None:
                raise ConfigError(
                    f"{option_name(key)} needs a sampled option, e.g. --lr loguniform:1e-4:1e-1"
                )
        return values, None
    if samples is None:
        d = space[0]
        raise ConfigError(f"{option_name(d.name)} {d.spec()} is sampled: say how many points, --samples N")
    return values, Search(space=tuple(space), samples=samples, seed=0 if search_seed is None else search_seed)


def grid_values(cli: dict[str, Any], file_values: dict[str, Any] | None = None) -> dict[str, list[Any]]:
    """Per training option, its list of values: CLI text overrides file values (no sampled options:
    `sweep_space` reads those too)."""
    values, search = sweep_space(cli, file_values)
    if search is not None:
        raise ConfigError(f"{search.describe()}: a random search, not a grid (read it with sweep_space)")
    return values


def expand_grid(values: dict[str, list[Any]], search: Search | None = None) -> list[TrainConfig]:
    """Each sampled point (or the one empty point of a plain grid) crossed with the cartesian product of
    the option lists, in that order; each point validated; duplicates (same run id) removed."""
    names = list(values)
    configs: dict[str, TrainConfig] = {}
    for point in search.points() if search else [{}]:
        for combo in itertools.product(*(values[n] for n in names)):
            cfg = TrainConfig(**dict(zip(names, combo)), **point)
            configs.setdefault(sweep_run_id(cfg), cfg)
    return list(configs.values())


def grid_size(values: dict[str, list[Any]], search: Search | None = None) -> int:
    size = search.samples if search else 1
    for v in values.values():
        size *= len(v)
    return size


def swept_keys(values: dict[str, list[Any]], search: Search | None = None) -> list[str]:
    """The options that vary across the runs (sampled, or listed with several values), in field order."""
    sampled = set(search.names) if search else set()
    return [n for n in TRAIN_FIELDS if n in sampled or len(values.get(n, ())) > 1]


def space_record(values: dict[str, list[Any]], search: Search | None = None) -> dict[str, Any]:
    """What the manifest records as the sweep's grid: per option its list, or for a sampled option
    {"distribution": "loguniform:0.0001:0.1", "samples": 20, "search_seed": 0}."""
    record: dict[str, Any] = dict(values)
    for d in search.space if search else ():
        record[d.name] = {"distribution": d.spec(), "samples": search.samples, "search_seed": search.seed}
    return record


def sweep_run_id(config: TrainConfig) -> str:
    return f"{config.model}-{config.config_id()}"


def default_sweep_name(
    run_ids: list[str], grid: dict[str, list[Any]] | None = None, search: Search | None = None
) -> str:
    """The folder name of a sweep given no --name: a hash of its runs; a random search's, of what it
    draws from (distributions, search seed, listed options) but not of how many points, so
    `--samples 30` after `--samples 20` goes to the same folder and trains only the 10 new points."""
    if search is None:
        key = ",".join(sorted(run_ids))
    else:
        drawn = ",".join(f"{d.name}={d.spec()}" for d in search.space)
        listed = ";".join(f"{k}={','.join(map(repr, v))}" for k, v in sorted((grid or {}).items()))
        key = f"search {drawn} seed={search.seed} {listed}"
    return "sweep-" + hashlib.sha256(key.encode()).hexdigest()[:8]
