"""`mnist-jobs report`: a folder of JSON results → one table (or csv/json/markdown, or a plot).

    rep = make_report("results/lr-study", sort="test_accuracy", top=10)
    console.print(build_table(rep))      # the CLI prints; nothing here writes to a terminal
    text = to_csv(rep)                   # also to_json, to_markdown, to_html (a page, plot embedded)
    plot(rep, "lr-study.png")            # matplotlib, imported only here (figure(rep): the Figure)

Each run becomes a flat dict (config keys, `device`, `world_size`, `partition`, metrics, timings,
status). Completed runs that differ only in the keys averaged over (by default: the seed) share one
row with mean ± std and n. Failed, running and pending runs (a sweep manifest's runs with no result
yet) are counted, and listed one per row with `include_all`. Files that are not readable results are
skipped and returned in `Report.skipped`; nothing in here raises on a bad file. No typer, no torch.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ADDED_BEFORE, TRAIN_FIELDS, ConfigError, parse_option
from .results import ResultError, load_result, strict_json

if TYPE_CHECKING:
    from rich.table import Table


# Keys, by role. Every flat run dict has all of these.
DERIVED = ("epochs",)  # resolved into iters: filterable and sortable, never a "varying" column
# where it ran: part of the row key; a column where it differs (partition: a SLURM run's, else None)
PLACEMENT = ("device", "world_size", "partition")
HYPERPARAMS = tuple(k for k in TRAIN_FIELDS if k not in DERIVED + PLACEMENT)  # every training option
CONFIG_KEYS = HYPERPARAMS + PLACEMENT
METRICS = ("test_accuracy", "test_loss", "final_train_loss", "train_s", "samples_per_s", "total_s")
INFO = ("run_id", "status")
KEYS = HYPERPARAMS + DERIVED + PLACEMENT + METRICS + INFO
AGGREGATE_BY_DEFAULT = ("seed",)
HIGHER_IS_BETTER = {"test_accuracy", "samples_per_s", "n"}
_METRIC_SOURCE = {
    "test_accuracy": "metrics",
    "test_loss": "metrics",
    "final_train_loss": "metrics",
    "train_s": "timings",
    "samples_per_s": "timings",
    "total_s": "timings",
}
_ALIASES = {"accuracy": "test_accuracy", "acc": "test_accuracy", "loss": "test_loss", "time": "train_s"}
_PREFIXES = ("config.", "metrics.", "timings.", "env.", "distributed.", "slurm.")
STATUSES = ("completed", "failed", "running", "pending")

# Machine formats: one fixed column order, whatever the data.
ROW_COLUMNS = (
    *HYPERPARAMS,
    *PLACEMENT,
    "n",
    *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
    "status",
    "error",
    "run_ids",
)


class ReportError(ValueError):
    """Bad report options (unknown key, bad filter, nothing to plot, no matplotlib)."""


# ---- keys ----------------------------------------------------------------------------------------


def resolve_key(name: str) -> str:
    """`lr`, `config.lr`, `metrics.test_accuracy`, `timings.train_s`, `env.device`, `acc` → a flat key."""
    key = name.strip()
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    key = _ALIASES.get(key, key).replace("-", "_")
    if key not in KEYS:
        raise ReportError(f"unknown key {name!r} (known: {', '.join(KEYS)})")
    return key


def _parse_value(key: str, text: str) -> list[Any]:
    """Typed values of a filter: `lr=1e-2` is the float 0.01; a comma list means any of them."""
    if key in HYPERPARAMS or key in DERIVED or key == "world_size":
        name = "batch_size" if key == "world_size" else key  # any int field parses an int
        try:
            return parse_option(name, text)
        except ConfigError as e:
            raise ReportError(str(e).replace(f"--{name.replace('_', '-')}", key)) from None
    parts = [p.strip() for p in text.split(",")]
    if key in METRICS:
        try:
            return [float(p) for p in parts]
        except ValueError:
            raise ReportError(f"{key} must be a number (got {text!r})") from None
    return parts


_FILTER_RE = re.compile(r"^\s*([A-Za-z_.\-]+)\s*(!=|>=|<=|==|=|>|<)\s*(.*?)\s*$")


@dataclass(frozen=True)
class Filter:
    key: str
    op: str
    values: tuple[Any, ...]
    text: str = ""  # as given (messages)

    def matches(self, run: dict[str, Any]) -> bool:
        v = run.get(self.key)
        if self.op in ("=", "!="):
            hit = v in self.values
            if self.key == "device" and isinstance(v, str):  # device=cuda matches cuda:0, cuda:1, ...
                hit = hit or v.split(":")[0] in self.values
            return hit if self.op == "=" else not hit
        if v is None:
            return False
        try:
            ref = self.values[0]
            return {">": v > ref, ">=": v >= ref, "<": v < ref, "<=": v <= ref}[self.op]
        except TypeError:  # a foreign value of another type
            return False


def parse_filter(text: str) -> Filter:
    """`KEY=VALUE` (VALUE may be a comma list: any of), `KEY!=VALUE`, `KEY>VALUE`, `>=`, `<`, `<=`."""
    m = _FILTER_RE.match(text)
    if not m or not m.group(3):
        raise ReportError(f"--filter must look like KEY=VALUE (got {text!r})")
    key = resolve_key(m.group(1))
    op = "=" if m.group(2) == "==" else m.group(2)
    try:
        values = _parse_value(key, m.group(3))
    except ReportError as e:
        raise ReportError(f"--filter {text!r}: {e}") from None
    if op not in ("=", "!=") and len(values) != 1:
        raise ReportError(f"--filter {text!r}: {op} takes one value")
    return Filter(key, op, tuple(values), text.strip())


# ---- loading -------------------------------------------------------------------------------------


def _scalar(v: Any) -> Any:
    """Config values as hashable scalars, whatever a foreign file holds."""
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


def _num(v: Any) -> float | None:
    """A number, or None: never NaN or infinity (a NaN in a file written before strict JSON reads as
    a float; the table shows it as missing, like null)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _error_text(error: Any) -> tuple[str | None, str | None]:
    """(type, "Type: message") of a record's error; (None, its text) for a foreign error value."""
    if not isinstance(error, dict):
        return None, (str(error) if error else None)
    kind = error.get("type") if isinstance(error.get("type"), str) and error.get("type") else None
    message = str(error.get("message") or "") or None
    if kind and not (message or "").startswith(kind):
        message = f"{kind}: {message}" if message else kind
    return kind, message


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    v = data.get(name)
    return v if isinstance(v, dict) else {}


def flatten(data: dict[str, Any], path: str | Path = "") -> dict[str, Any]:
    """One result (or manifest entry) as a flat run dict with every key in KEYS."""
    cfg, metrics = _section(data, "config"), _section(data, "metrics")
    timings, env, dist = _section(data, "timings"), _section(data, "env"), _section(data, "distributed")
    before = ADDED_BEFORE if cfg else {}  # a result from before an option existed ran as its default
    run: dict[str, Any] = {k: _scalar(cfg.get(k, before.get(k))) for k in HYPERPARAMS + DERIVED}
    run["device"] = _scalar(env.get("device") or cfg.get("device"))  # what it ran on, not "auto"
    run["world_size"] = _scalar(dist.get("world_size", 1))
    run["partition"] = _scalar(_section(data, "slurm").get("partition"))
    for k in METRICS:
        run[k] = _num((metrics if _METRIC_SOURCE[k] == "metrics" else timings).get(k))
    error_type, error = _error_text(data.get("error"))
    run.update(
        run_id=str(data.get("run_id")),
        status=str(data.get("status")),
        error=error,  # "Diverged: train loss became nan at iteration 500 (lr 1000); lower --lr"
        error_type=error_type,
        path=str(path),
        finished_at=data.get("finished_at") if isinstance(data.get("finished_at"), str) else None,
        history=metrics.get("history") if isinstance(metrics.get("history"), list) else [],
    )
    return run


def _load_manifest(path: Path) -> dict[str, Any]:
    from .sweepdir import ManifestError, read_manifest

    try:
        return read_manifest(path.parent) or {}
    except ManifestError as e:
        raise ResultError(str(e)) from None


def load_runs(root: Path | str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Every run under root as a flat dict, plus (path, reason) for each file that was skipped.

    A run named in a sweep.json manifest whose result file does not exist yet is a "pending" run."""
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root} does not exist")
    from .results import result_path
    from .sweepdir import scan

    found, manifest_paths = scan(root)
    paths, manifests = [str(p) for p in found], manifest_paths
    runs: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for p in paths:
        try:
            data = load_result(p).data
            if not isinstance(data["config"], dict) or not isinstance(data["metrics"], dict):
                raise ResultError(f"{p}: config and metrics must be objects")
        except ResultError as e:
            skipped.append((p, str(e)))
            continue
        runs.append(flatten(data, p))
    seen = {r["path"]: r for r in runs}
    seen_paths = set(paths)
    from .sweepdir import superseded

    for m in manifests:
        try:
            manifest = _load_manifest(m)
        except ResultError as e:
            skipped.append((str(m), str(e)))
            continue
        # a result written before its run was submitted again (--retry-failed, --force) while that
        # submission is still live: the run counts as running or pending, not as its old result
        finished = {
            run_id: seen[p]["finished_at"]
            for run_id in manifest["runs"]
            if (p := str(result_path(m.parent, run_id))) in seen
        }
        for run_id, now in superseded(m.parent, manifest, finished).items():
            old = seen[str(result_path(m.parent, run_id))]
            keep = {k: old[k] for k in (*HYPERPARAMS, *DERIVED, *PLACEMENT, "run_id", "path")}
            old.clear()
            old.update(flatten({}), **keep, status=now, job_id=manifest["runs"][run_id].get("job_id"))
        for run_id, entry in manifest["runs"].items():
            if str(result_path(m.parent, run_id)) in seen_paths:
                continue  # finished (or an unreadable file, already counted as skipped)
            entry = entry if isinstance(entry, dict) else {}
            run = flatten({"config": entry.get("config"), "run_id": run_id, "status": "pending"})
            run["job_id"] = entry.get("job_id")
            if run["device"] == "auto":
                run["device"] = None  # not chosen until it runs
            runs.append(run)
    return runs, skipped


# ---- selecting, grouping, sorting ----------------------------------------------------------------


def varying_keys(runs: Sequence[dict[str, Any]], keys: Iterable[str] = HYPERPARAMS) -> list[str]:
    """Keys with more than one value across runs (None counts as a value unless it is the only one)."""
    out = []
    for k in keys:
        values = {r[k] for r in runs}
        if len(values) > 1:
            out.append(k)
    return out


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values), like statistics.stdev."""
    if not values:
        return None, None
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (n - 1))


def _merged(values: Iterable[Any]) -> Any:
    """The common value of a group, or a comma list of its different values (for device, world size)."""
    distinct = sorted({v for v in values}, key=_order)
    return distinct[0] if len(distinct) == 1 else ", ".join(str(v) for v in distinct)


def make_row(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One table row from runs that share a configuration: means, stds, n and the run ids."""
    row: dict[str, Any] = {}
    for k in HYPERPARAMS:
        values = {r[k] for r in runs}
        row[k] = next(iter(values)) if len(values) == 1 else None  # None: averaged over
    for k in PLACEMENT:
        row[k] = _merged(r[k] for r in runs)
    row["n"] = len(runs)
    for m in METRICS:
        row[f"{m}_mean"], row[f"{m}_std"] = _stats([r[m] for r in runs if r[m] is not None])
    statuses = {r["status"] for r in runs}
    row["status"] = _merged(statuses)
    errors = [r["error"] for r in runs if r.get("error")]
    row["error"] = errors[0] if errors else None
    row["job_id"] = runs[0].get("job_id") if len(runs) == 1 else None  # a pending run's SLURM job
    row["run_ids"] = [r["run_id"] for r in runs]
    row["runs"] = list(runs)
    return row


def group_runs(runs: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of runs with equal values for keys (in first-seen order)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return [make_row(g) for g in groups.values()]


def _order(v: Any) -> tuple[Any, ...]:
    """A sort key that never compares a number with a text (or None): numbers, then texts, then None."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return (2,)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, v)
    return (1, str(v))


def _row_value(row: dict[str, Any], key: str) -> Any:
    return row.get(f"{key}_mean") if key in METRICS else row.get(key)


def sort_rows(
    rows: list[dict[str, Any]], key: str | None, columns: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """By key (best first for accuracy and throughput, ascending otherwise; missing values last), or,
    without a key, by the shown columns in order."""
    if key is None:
        return sorted(rows, key=lambda r: [_order(r.get(c)) for c in columns])
    if key in HIGHER_IS_BETTER:

        def desc(r: dict[str, Any]) -> tuple[Any, ...]:
            o = _order(_row_value(r, key))
            return (o[0], -o[1]) if o[0] == 0 else o

        return sorted(rows, key=desc)
    return sorted(rows, key=lambda r: _order(_row_value(r, key)))


@dataclass
class Report:
    root: str
    rows: list[dict[str, Any]]  # completed runs, one row per configuration, sorted, cut to --top
    columns: list[str]  # hyperparameters that vary across the shown runs (table columns)
    constants: dict[str, Any]  # hyperparameters with one value across the shown runs
    grouped_over: list[str]  # varying keys averaged within a row (seed by default)
    counts: dict[str, int]  # selected runs per status
    skipped: list[tuple[str, str]]  # (path, reason) of files that are not readable results
    runs: list[dict[str, Any]] = field(default_factory=list)  # the selected completed runs
    other_rows: list[dict[str, Any]] = field(default_factory=list)  # failed/running/pending (--all)
    include_all: bool = False
    total_rows: int = 0  # completed rows before --top
    diverged: int = 0  # failed runs (of counts["failed"]) whose error is Diverged
    filters: list[Filter] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)  # completed runs counted once
    loaded: list[dict[str, Any]] = field(default_factory=list)  # every run found, before --filter

    @property
    def no_match(self) -> str | None:
        """Why nothing is shown when runs were found but --filter kept none of them: the filters, how
        many runs there are, and the values each filtered key takes there (None otherwise)."""
        if not self.filters or not self.loaded or any(self.counts.values()):
            return None
        takes = []
        for key in dict.fromkeys(f.key for f in self.filters):
            values = sorted({r.get(key) for r in self.loaded} - {None}, key=_order)
            shown = ", ".join(fmt_value(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
            takes.append(f"{key} takes {shown}" if values else f"{key} is never set")
        given = " ".join(f"--filter {f.text}" for f in self.filters)
        n = len(self.loaded)
        found = f"{n} run{'s' if n != 1 else ''}"
        return f"no run under {self.root} matches {given} ({found}; {'; '.join(takes)})"

    @property
    def best(self) -> int | None:
        """Index of the row with the highest mean test accuracy."""
        scored = [(r["test_accuracy_mean"], -i) for i, r in enumerate(self.rows) if _finite(r)]
        return -max(scored)[1] if scored else None

    @property
    def all_rows(self) -> list[dict[str, Any]]:
        return self.rows + self.other_rows


def _finite(row: dict[str, Any]) -> bool:
    v = row.get("test_accuracy_mean")
    return v is not None and math.isfinite(v)


def _without_duplicates(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(runs, the duplicates left out): of completed runs with the same configuration, seed and
    placement (a sweep folder copied, the same run in two folders), the newest alone, so that a row's
    mean ± std and n are over distinct runs, never one run counted twice as if over seeds."""
    newest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in runs:
        key = tuple(r[k] for k in (*HYPERPARAMS, *PLACEMENT))
        if key not in newest or (r["finished_at"] or "") > (newest[key]["finished_at"] or ""):
            newest[key] = r
    kept = {id(r) for r in newest.values()}
    return [r for r in runs if id(r) in kept], [r for r in runs if id(r) not in kept]


def make_report(
    root: Path | str,
    *,
    sort: str | None = None,
    top: int | None = None,
    group_by: Sequence[str] | str | None = None,
    group: bool = True,
    filters: Sequence[str | Filter] = (),
    include_all: bool = False,
) -> Report:
    """Load, select, group and sort: everything the table and the machine formats show."""
    if group_by is not None and not group:
        raise ReportError("give --group-by or --no-group, not both")
    if top is not None and top < 1:
        raise ReportError(f"--top must be >= 1 (got {top})")
    sort_key = resolve_key(sort) if sort else ("test_accuracy" if top else None)
    parsed = [f if isinstance(f, Filter) else parse_filter(f) for f in filters]
    keys: list[str] | None = None
    if group_by is not None:
        names = group_by.split(",") if isinstance(group_by, str) else list(group_by)
        keys = [resolve_key(k) for k in names if k.strip()]
        if not keys:
            raise ReportError("--group-by needs at least one key")
        bad = [k for k in keys if k not in CONFIG_KEYS]
        if bad:
            raise ReportError(f"--group-by takes config keys ({', '.join(CONFIG_KEYS)}), not {bad[0]}")

    all_runs, skipped = load_runs(root)
    selected = [r for r in all_runs if all(f.matches(r) for f in parsed)]
    counts = {s: 0 for s in STATUSES}
    for r in selected:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    diverged = sum(r["status"] == "failed" and r.get("error_type") == "Diverged" for r in selected)
    done, duplicates = _without_duplicates([r for r in selected if r["status"] == "completed"])
    counts["completed"] -= len(duplicates)
    others = [r for r in selected if r["status"] != "completed"]
    shown = done + others if include_all else done

    varying = varying_keys(shown)
    constants = {
        k: shown[0][k] for k in HYPERPARAMS if k not in varying and shown and shown[0][k] is not None
    }
    if keys is not None:
        row_keys, columns = keys, [k for k in keys if k in HYPERPARAMS]
    elif group:
        columns = [k for k in varying if k not in AGGREGATE_BY_DEFAULT]
        row_keys = columns + list(PLACEMENT)
    else:
        columns, row_keys = varying, [*HYPERPARAMS, *PLACEMENT, "run_id"]
    grouped_over = [k for k in varying if k not in row_keys]

    rows = sort_rows(group_runs(done, row_keys), sort_key, columns)
    total = len(rows)
    if top is not None:
        rows = rows[:top]
    other_rows = sort_rows([make_row([r]) for r in others], None, ["status", *columns]) if include_all else []
    return Report(
        root=str(root),
        rows=rows,
        columns=columns,
        constants=constants,
        grouped_over=grouped_over,
        counts=counts,
        skipped=skipped,
        runs=done,
        other_rows=other_rows,
        include_all=include_all,
        total_rows=total,
        diverged=diverged,
        filters=parsed,
        loaded=all_runs,
        duplicates=duplicates,
    )


# ---- text ----------------------------------------------------------------------------------------


def fmt_value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _fmt_stat(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _fmt_seconds(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


METRIC_HEADERS = ("test acc %", "test loss", "train s", "n")
EXTRA_HEADERS = {"device": "device", "world_size": "world", "partition": "partition", "status": "status"}


def extra_columns(rep: Report) -> list[str]:
    """device, world_size, partition and status get a column where they differ between the rows;
    where they do not, the caption says them once (like every other constant setting)."""
    rows = rep.all_rows
    out = [k for k in PLACEMENT if len({str(r[k]) for r in rows if r[k] is not None}) > 1]
    if any(r["status"] != "completed" for r in rows):
        out.append("status")
    return out


def table_headers(rep: Report) -> list[str]:
    return [*rep.columns, *METRIC_HEADERS, *(EXTRA_HEADERS[k] for k in extra_columns(rep))]


def table_cells(row: dict[str, Any], columns: Sequence[str], extras: Sequence[str] = ()) -> list[str]:
    """The text of one row as the table and the markdown show it."""
    status = row["status"]
    if row.get("job_id"):
        status += f" (job {row['job_id']})"
    if row.get("error") and "failed" in status:
        status += f": {row['error']}"
    shown = {**{k: fmt_value(row[k]) for k in PLACEMENT}, "status": status}
    return [
        *(fmt_value(row[c]) for c in columns),
        _fmt_stat(row["test_accuracy_mean"], row["test_accuracy_std"], 2),
        _fmt_stat(row["test_loss_mean"], row["test_loss_std"], 4),
        _fmt_seconds(row["train_s_mean"]),
        str(row["n"]),
        *(shown[k] for k in extras),
    ]


def caption_lines(rep: Report) -> list[str]:
    """What the table does not say in its cells: constant settings, what rows average, the footer."""
    lines = []
    same = dict(rep.constants)
    if rep.all_rows:
        extras = extra_columns(rep)
        for k in PLACEMENT:
            known = [r[k] for r in rep.all_rows if r[k] is not None]
            if k not in extras and known:
                same[k] = known[0]
    if same:
        lines.append("same for all: " + "  ".join(f"{k}={fmt_value(v)}" for k, v in same.items()))
    if rep.grouped_over:
        lines.append(f"mean ± std over {', '.join(rep.grouped_over)} (n runs per row)")
    if rep.total_rows > len(rep.rows):
        lines.append(f"top {len(rep.rows)} of {rep.total_rows} rows")
    lines.append(footer(rep))
    return lines


def footer(rep: Report) -> str:
    parts = [f"{n} {status}" for status, n in rep.counts.items() if n or status == "completed"]
    if rep.diverged:
        i = next(i for i, p in enumerate(parts) if p.endswith(" failed"))
        parts[i] += f" ({rep.diverged} diverged)"
    if rep.counts.get("pending"):
        i = next(i for i, p in enumerate(parts) if p.endswith(" pending"))
        parts[i] += " (no result yet)"
    if rep.duplicates:
        n = len(rep.duplicates)
        same = "same config and seed as a newer result"
        parts.append(f"{n} duplicate{'s' if n != 1 else ''} left out ({same})")
    if rep.skipped:
        parts.append(f"{len(rep.skipped)} file{'s' if len(rep.skipped) != 1 else ''} skipped")
    text = " · ".join(parts)
    unfinished = sum(n for s, n in rep.counts.items() if s != "completed")
    if unfinished and not rep.include_all:
        text += "  (--all lists the unfinished runs)"
    return text


def build_table(rep: Report) -> Table:
    """The report as a rich Table; the best row (highest mean test accuracy) in bold green."""
    from rich.table import Table

    table = Table(
        title=f"{rep.root}",
        caption="\n".join(caption_lines(rep)),
        caption_justify="left",
        header_style="bold",
    )
    extras = extra_columns(rep)
    for h in table_headers(rep):
        left = ("model", "optimizer", "device", "partition", "status")
        table.add_column(h, justify="left" if h in left else "right")
    best = rep.best
    for i, row in enumerate(rep.rows):
        last = i == len(rep.rows) - 1 and bool(rep.other_rows)  # a rule between finished and the rest
        table.add_row(
            *table_cells(row, rep.columns, extras),
            style="bold green" if i == best else None,
            end_section=last,
        )
    for row in rep.other_rows:
        table.add_row(*table_cells(row, rep.columns, extras), style="dim")
    return table


def machine_rows(rep: Report) -> list[dict[str, Any]]:
    """Rows with exactly ROW_COLUMNS, plain values (None for empty; run_ids a list)."""
    out = []
    for row in rep.all_rows:
        d = {c: row.get(c) for c in ROW_COLUMNS}
        for c, v in d.items():
            if isinstance(v, float):
                d[c] = round(v, 6) if math.isfinite(v) else None  # strict JSON; csv shows it empty
        out.append(d)
    return out


def to_csv(rep: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(ROW_COLUMNS)
    for d in machine_rows(rep):
        d["run_ids"] = " ".join(d["run_ids"])
        w.writerow(["" if d[c] is None else d[c] for c in ROW_COLUMNS])
    return buf.getvalue()


def to_json(rep: Report) -> str:
    doc = {
        "kind": "mnist-jobs/report",
        "root": rep.root,
        "columns": list(ROW_COLUMNS),
        "varying": rep.columns,
        "constants": rep.constants,
        "grouped_over": rep.grouped_over,
        "counts": rep.counts,
        "diverged": rep.diverged,
        "skipped": [{"path": p, "reason": r} for p, r in rep.skipped],
        "rows": machine_rows(rep),
    }
    return strict_json(doc, indent=2) + "\n"  # (a foreign file's NaN config value: null)


def to_markdown(rep: Report) -> str:
    """A GitHub table: the columns of the rich table plus the run ids, then the caption lines."""
    extras = extra_columns(rep)
    headers = [*table_headers(rep), "runs"]

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    right = set(rep.columns) - {"model", "optimizer"} | {"test acc %", "test loss", "train s", "n", "world"}
    out = [line(headers), "|" + "|".join("---:" if h in right else "---" for h in headers) + "|"]
    best = rep.best
    for i, row in enumerate(rep.all_rows):
        cells = [*table_cells(row, rep.columns, extras), ", ".join(row["run_ids"])]
        if i == best:
            cells = [f"**{c}**" for c in cells]
        out.append(line(cells))
    out.append("")
    out.extend(f"{s}  " for s in caption_lines(rep))
    return "\n".join(out).rstrip() + "\n"


# ---- html ----------------------------------------------------------------------------------------

HTML_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.25em; font-weight: 600; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: 0.3em 0.8em; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
th { border-bottom: 2px solid #888; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { font-weight: bold; color: #0a7a2f; }
tr.other td { color: #777; }
tr.first-other td { border-top: 2px solid #888; }
p.caption { margin: 0.2em 0; color: #444; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; }
"""
NUM_CLASS = ' class="num"'


def to_html(rep: Report, *, plots: bool = True) -> str:
    """One self-contained page: the table (the terminal table's columns plus the run ids; the best row
    bold green, unfinished runs grey), its caption, and the plot as a PNG embedded in a data: URI. It
    loads nothing else (no file, script, style sheet or font from anywhere). Without matplotlib, or
    with no completed run to plot, a line says so where the plot would be."""
    e = html.escape
    extras = extra_columns(rep)
    headers = [*table_headers(rep), "runs"]
    right = set(rep.columns) - {"model", "optimizer"} | {"test acc %", "test loss", "train s", "n", "world"}

    def cells(tag: str, values: Iterable[str]) -> str:
        return "".join(
            f"<{tag}{NUM_CLASS if h in right else ''}>{e(v)}</{tag}>" for h, v in zip(headers, values)
        )

    body = [f"<thead><tr>{cells('th', headers)}</tr></thead>", "<tbody>"]
    best = rep.best
    for i, row in enumerate(rep.all_rows):
        other = i >= len(rep.rows)
        kind = "best" if i == best else "other" if other else "done"
        if other and i == len(rep.rows) and rep.rows:
            kind += " first-other"
        values = [*table_cells(row, rep.columns, extras), ", ".join(row["run_ids"])]
        body.append(f'<tr class="{kind}">{cells("td", values)}</tr>')
    body.append("</tbody>")
    figure_html = ""
    if plots:
        try:
            png = base64.b64encode(plot_png(rep)).decode("ascii")
            alt = "test accuracy against each swept setting, and test accuracy during training"
            figure_html = f'<figure><img alt="{e(alt)}" src="data:image/png;base64,{png}"></figure>'
        except ReportError as err:
            figure_html = f'<p class="caption">No plot: {e(str(err))}</p>'
    caption = "".join(f'<p class="caption">{e(line)}</p>' for line in caption_lines(rep))
    title = f"mnist-jobs report: {rep.root}"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{HTML_STYLE}</style></head>\n<body>\n<h1>{e(title)}</h1>\n"
        f'<table id="report">{"".join(body)}</table>\n{caption}\n{figure_html}\n</body></html>\n'
    )


# ---- plot ----------------------------------------------------------------------------------------

PLOT_DPI = 110


def _label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in values.items()) or "all runs"


def figure(rep: Report, *, max_lines: int = 6, max_curves: int = 8) -> Any:
    """The plot as a matplotlib Figure (not saved): test accuracy vs each swept hyperparameter (error
    bars: std over seeds; a log axis where its values span a decade or more, as lrs do), and the mean
    test-accuracy curve of the best rows from the runs' histories. Needs matplotlib (the `plot` extra)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError(
            "--plot needs matplotlib, which is not installed: pip install 'mnist-jobs[plot]'"
        ) from None
    runs = [r for r in rep.runs if r["test_accuracy"] is not None]
    if not runs:
        raise ReportError("nothing to plot: no completed runs with a test accuracy")
    swept = [k for k in varying_keys(runs) if k not in AGGREGATE_BY_DEFAULT]
    panels = len(swept) + 1
    ncols = min(panels, 3)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(5.2 * ncols, 4.2 * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.set_visible(False)

    for ax, key in zip(axes, swept):
        _plot_sweep(ax, runs, key, [k for k in swept if k != key], max_lines)
    _plot_curves(axes[len(swept)], rep, max_curves)

    title = f"{rep.root} — {len(runs)} runs"
    if rep.constants:
        shown = [f"{k}={fmt_value(v)}" for k, v in rep.constants.items() if k != "seed"]
        title += "\n" + "  ".join(shown)
    fig.suptitle(title, fontsize=10)
    return fig


def plot(rep: Report, path: Path | str, *, max_lines: int = 6, max_curves: int = 8) -> Path:
    """`figure`, written to path (PNG, or another format by its suffix)."""
    fig = figure(rep, max_lines=max_lines, max_curves=max_curves)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI)
    return path


def plot_png(rep: Report, **kwargs: Any) -> bytes:
    """`figure` as PNG bytes (for the HTML page)."""
    buf = io.BytesIO()
    figure(rep, **kwargs).savefig(buf, format="png", dpi=PLOT_DPI)
    return buf.getvalue()


def log_axis(xs: Sequence[Any]) -> bool:
    """A swept setting's axis is logarithmic when its values are positive numbers spanning a decade or
    more (0.001, 0.01 is one: 10x, allowing float rounding; 0.01, 0.05 is not)."""
    nums = [_num(x) for x in xs]
    positive = [v for v in nums if v is not None and v > 0]
    if not positive or len(positive) < len(nums):
        return False
    return max(positive) / min(positive) >= 10 * (1 - 1e-9)


def _plot_sweep(ax: Any, runs: list[dict[str, Any]], key: str, others: list[str], max_lines: int) -> None:
    xs = sorted({r[key] for r in runs}, key=_order)
    numeric = all(_num(x) is not None for x in xs)
    pos = {x: (x if numeric else i) for i, x in enumerate(xs)}
    combos: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        combos.setdefault(tuple(r[o] for o in others), []).append(r)
    spread = "std over seeds"
    if len(combos) > max_lines:  # too many lines to read: average over the other settings
        combos = {("mean over other settings",): runs}
        others = []
        spread = "std over seeds and other settings"
    for combo, members in sorted(combos.items(), key=lambda kv: [_order(v) for v in kv[0]]):
        px, py, pe = [], [], []
        for x in xs:
            accs = [r["test_accuracy"] for r in members if r[key] == x]
            if accs:
                mean, std = _stats(accs)
                px.append(pos[x])
                py.append(mean)
                pe.append(std or 0.0)
        label = _label(dict(zip(others, combo))) if others else (combo[0] if combo else "all runs")
        ax.errorbar(px, py, yerr=pe, marker="o", capsize=4, label=str(label))
    if numeric and log_axis(xs):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    elif len(xs) <= 8:
        ax.set_xticks(xs, [fmt_value(x) for x in xs])
        ax.minorticks_off()
    ax.set_xlabel(key)
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"test accuracy vs {key} (± {spread})", fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(combos) > 1 or others:
        ax.legend(fontsize=8)


def _plot_curves(ax: Any, rep: Report, max_curves: int) -> None:
    rows = [r for r in rep.rows if _finite(r)]
    title = "test accuracy during training (mean ± std)"
    if len(rows) > max_curves:
        title = f"test accuracy during training, best {max_curves} of {len(rows)} rows"
        rows = sort_rows(rows, "test_accuracy")[:max_curves]
    named = varying_keys(rows, rep.columns) or rep.columns  # label by what differs among the curves
    for row in rows:
        by_iter: dict[float, list[float]] = {}
        for run in row["runs"]:
            for h in run["history"]:
                it, acc = (
                    (_num(h.get("iteration")), _num(h.get("test_accuracy")))
                    if isinstance(h, dict)
                    else (None, None)
                )
                if it is not None and acc is not None:
                    by_iter.setdefault(it, []).append(acc)
        if not by_iter:
            continue
        its = sorted(by_iter)
        stats = [_stats(by_iter[i]) for i in its]
        means = [m for m, _ in stats]
        label = _label({c: row[c] for c in named}) + f" (n={row['n']})"
        (line,) = ax.plot(its, means, marker=".", label=label)
        if row["n"] > 1:
            lo = [m - (s or 0.0) for m, s in stats]
            hi = [m + (s or 0.0) for m, s in stats]
            ax.fill_between(its, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy %")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        long = max(len(line.get_label()) for line in ax.lines) > 32
        # long labels go under the plot, where they cannot hide the curves
        ax.legend(fontsize=8, **({"loc": "upper center", "bbox_to_anchor": (0.5, -0.14)} if long else {}))
