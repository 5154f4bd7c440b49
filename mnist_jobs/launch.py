"""Launching a sweep from the login node (or a laptop): typed options -> a plan -> SLURM or here.

    opts = SweepOptions.from_sources(training=..., slurm=..., config_file=path, ...)  # validated once
    plan = make_plan(opts)                 # the grid (and sampled points), run ids, sweep folder
    preflight(plan)                        # will this run / will SLURM take it? nothing written yet
    todo, skipped = plan.todo()            # resume: what is left to do
    tasks, groups = make_tasks(plan, todo) # one TrainTask per run or per pack
    submit(plan, tasks, groups)  or  run_here(plan, tasks, groups, on_event)

Every refusal is a `LaunchError` or a `ConfigError` whose message is one sentence; cli.py renders what
these return and turns those errors into one line, exit 2. The SLURM backend is slurm.py, the local one
local.py, the sweep folder's format sweepdir.py, the job a compute node runs job.py.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .claims import warn_if_claims_node_local
from .config import ConfigError, SlurmConfig, TrainConfig, check_no_control, option_name, parse_slurm_opt
from .grid import (
    MAX_GRID,
    Search,
    default_sweep_name,
    expand_grid,
    grid_size,
    read_sweep_file,
    space_record,
    sweep_run_id,
    sweep_space,
    swept_keys,
)
from .job import DEFAULT_MAX_REQUEUES, TrainTask
from .slurm import LaunchError
from .sweepdir import LOG_DIR, plan_runs, record_submission, resumable_packs

EXECUTORS = ("auto", "slurm", "local", "debug")
SLURM_FIELDS = tuple(f.name for f in dataclasses.fields(SlurmConfig))
RUNS_ANYWHERE = ("tasks_per_node",)  # SLURM fields that do not by themselves mean "submit to SLURM"


def slurm_config(values: dict[str, Any], *, where: str = "") -> SlurmConfig:
    """A SlurmConfig from option values keyed by field name (None / empty = not given). `slurm_opts`
    may be KEY=VALUE strings or a {key: value} table, `setup` one line or several. An unknown key
    names itself and the valid ones."""
    unknown = sorted(set(values) - set(SLURM_FIELDS))
    if unknown:
        raise ConfigError(
            f"{where}unknown SLURM option(s) {', '.join(map(repr, unknown))} "
            f"(valid: {', '.join(SLURM_FIELDS)})"
        )
    kwargs = {k: v for k, v in values.items() if v is not None and v != [] and v != ()}
    opts = kwargs.get("slurm_opts")
    if isinstance(opts, dict):
        kwargs["slurm_opts"] = tuple(parse_slurm_opt(f"{k}={v}") for k, v in opts.items())
    elif opts is not None:
        kwargs["slurm_opts"] = tuple(parse_slurm_opt(s) for s in ([opts] if isinstance(opts, str) else opts))
    setup = kwargs.get("setup")
    if setup is not None:
        kwargs["setup"] = (setup,) if isinstance(setup, str) else tuple(setup)
    try:
        return SlurmConfig(**kwargs)
    except TypeError as e:  # e.g. a TOML value of the wrong shape
        raise ConfigError(f"{where}bad SLURM option: {e}") from None


@dataclass(frozen=True, kw_only=True)
class SweepOptions:
    """Everything one launch needs, from the command line and a sweep file merged, validated once.

    `grid`: per training option, its list of values; `search`: the sampled options (random search),
    whose points are crossed with the grid, or None. `executor`: resolved (slurm when any SLURM option
    was given, on the command line or in the file's [slurm] table; else local)."""

    grid: dict[str, list[Any]]
    search: Search | None = None
    slurm: SlurmConfig
    executor: str
    results_dir: Path
    data_dir: Path | None = None
    name: str | None = None
    pack: int = 1
    max_parallel: int | None = None
    retry_failed: bool = False
    force: bool = False
    checkpoint_every: int | None = None
    max_requeues: int = DEFAULT_MAX_REQUEUES
    allow_huge: bool = False  # --yes: grids over MAX_GRID runs
    # SLURM options given (on the command line, or in the file's [slurm] table) that only a SLURM job
    # uses, by option name: a local run ignores them, and the CLI says so (`ignored_here`)
    slurm_given: tuple[str, ...] = ()

    @property
    def ignored_here(self) -> list[str]:
        """The SLURM options given that this launch ignores: all of them, unless it submits to SLURM."""
        return [] if self.executor == "slurm" else list(self.slurm_given)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS[1:]:
            raise ConfigError(f"--executor must be auto, slurm or local (got {self.executor!r})")
        for key, minimum in (("pack", 1), ("max_parallel", 1), ("checkpoint_every", 0), ("max_requeues", 0)):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{option_name(key)} must be an integer (got {value!r})")
            if value is not None and value < minimum:
                raise ConfigError(f"{option_name(key)} must be >= {minimum} (got {value!r})")
        s = self.slurm
        if self.pack > 1 and (s.tasks_per_node > 1 or s.nodes > 1):
            raise ConfigError(
                f"--pack {self.pack} cannot be combined with several tasks per job (--tasks-per-node "
                f"{s.tasks_per_node}, --nodes {s.nodes}): a pack trains in one process"
            )
        if self.executor != "slurm" and s.nodes > 1:
            raise ConfigError(f"--nodes {s.nodes} needs SLURM; the local executor runs on one node")
        if self.name is not None:
            check_sweep_name(self.name)
        # the sweep folder is in the sbatch script (--output, --error): one line each, nothing else
        check_no_control("--results-dir", str(self.results_dir))
        if self.data_dir is not None:
            check_no_control("--data-dir", str(self.data_dir))

    @classmethod
    def from_sources(
        cls,
        *,
        training: dict[str, Any],
        slurm: dict[str, Any],
        config_file: Path | None = None,
        executor: str = "auto",
        name: str | None = None,
        samples: int | None = None,
        search_seed: int | None = None,
        **behaviour: Any,
    ) -> SweepOptions:
        """Command-line values (None: not given) over a TOML sweep file's. The executor is decided from
        the merged options, so a file's `[slurm] partition = "gpu"` submits like `--partition gpu`.
        `samples` / `search_seed`: a random search over the sampled options (`--lr loguniform:A:B`)."""
        if executor not in EXECUTORS:
            raise ConfigError(f"--executor must be auto, slurm or local (got {executor!r})")
        file = read_sweep_file(config_file) if config_file else {}
        where = f"--config {config_file}: " if config_file else ""
        table = file.get("slurm") or {}
        if not isinstance(table, dict):
            raise ConfigError(f"{where}[slurm] must be a table (got {table!r})")
        table = {k.replace("-", "_"): v for k, v in table.items()}
        if "slurm_opt" in table:  # the command line's name for it
            table["slurm_opts"] = table.pop("slurm_opt")
        given_cli = {
            k: v for k, v in slurm.items() if v is not None and v is not False and v != [] and v != ()
        }
        slurm_cfg = slurm_config({**table, **given_cli}, where=where)
        merged = {**table, **given_cli}
        wants_slurm = any(k not in RUNS_ANYWHERE for k in merged)
        kind = executor if executor != "auto" else ("slurm" if wants_slurm else "local")
        grid, search = sweep_space(training, file, samples=samples, search_seed=search_seed)
        return cls(
            grid=grid,
            search=search,
            slurm=slurm_cfg,
            executor=kind,
            name=name if name is not None else file.get("name"),
            slurm_given=tuple(
                option_name(k) + ("" if k in given_cli else f" ({where.removesuffix(': ')} [slurm])")
                for k in merged
                if k not in RUNS_ANYWHERE
            ),
            **behaviour,
        )


def check_sweep_name(name: Any) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"--name must be a plain folder name (got {name!r})")
    check_no_control("--name", name)  # it is the job's name in the sbatch script
    size = len(name.encode(errors="surrogateescape"))
    if size > 200:
        raise ConfigError(f"--name must be at most 200 bytes long (got {size})")


@dataclass(frozen=True)
class Plan:
    """A launch, planned: the options, the grid's runs, and the sweep folder they go to."""

    options: SweepOptions
    configs: list[TrainConfig]
    run_ids: list[str]
    name: str

    @property
    def folder(self) -> Path:
        return self.options.results_dir / self.name

    @property
    def executor(self) -> str:
        return self.options.executor

    @property
    def swept(self) -> list[str]:
        """The training options that vary across the runs (sampled or listed), in field order."""
        return swept_keys(self.options.grid, self.options.search)

    @property
    def space(self) -> dict[str, Any]:
        """The sweep's grid as the manifest records it (lists; a sampled option's distribution)."""
        return space_record(self.options.grid, self.options.search)

    def config(self, run_id: str) -> TrainConfig:
        return self.configs[self.run_ids.index(run_id)]

    def todo(self) -> tuple[list[str], dict[str, list[str]]]:
        """The runs left to do, and the skipped ones by reason (completed, failed, queued, running)."""
        o = self.options
        return plan_runs(self.folder, self.run_ids, retry_failed=o.retry_failed, force=o.force)

    def resumed(self, run_ids: list[str] | None = None) -> list[list[str]]:
        """The tasks that resume from a checkpoint in the sweep folder, packed as they were packed
        when it was written (sweepdir.resumable_packs); none with --force (it starts afresh). Under
        DDP (a pack cannot be) only lone runs."""
        if self.options.force:
            return []
        ids = self.run_ids if run_ids is None else run_ids
        s = self.options.slurm
        ddp = s.tasks_per_node * s.nodes > 1
        kept = resumable_packs(self.folder, ids, carriable=self.run_ids)  # (may carry runs not in ids)
        return [g for g in kept if len(g) == 1 or not ddp]

    def groups(self, run_ids: list[str] | None = None) -> list[list[str]]:
        """The runs (default: all) as the array's tasks: those a checkpoint resumes as they were
        packed (`resumed`: such a pack may carry a run not in `run_ids`, see make_tasks), the others
        one each or in packs of --pack (`packing.group_for_packing`); ordered by their first run. The
        dry run and the submission both use this."""
        ids = self.run_ids if run_ids is None else run_ids
        kept = self.resumed(ids)
        taken = {r for g in kept for r in g}
        rest = [r for r in ids if r not in taken]
        if self.options.pack <= 1:
            fresh = [[r] for r in rest]
        else:
            from .packing import PackError, group_for_packing

            try:
                fresh = [
                    [rest[i] for i in g]
                    for g in group_for_packing([self.config(r) for r in rest], self.options.pack)
                ]
            except PackError as e:
                raise ConfigError(str(e)) from None
        order = {r: i for i, r in enumerate(self.run_ids)}
        return sorted(kept + fresh, key=lambda g: min(order[r] for r in g))


def make_plan(opts: SweepOptions, *, name: str | None = None) -> Plan:
    """Expand the grid, name the sweep, check what can be checked without touching anything."""
    size = grid_size(opts.grid, opts.search)
    if size > MAX_GRID and not opts.allow_huge:
        raise ConfigError(f"the grid has {size:,} runs (more than {MAX_GRID:,}); pass --yes to run it anyway")
    configs = expand_grid(opts.grid, opts.search)
    run_ids = [sweep_run_id(c) for c in configs]
    name = name or opts.name or default_sweep_name(run_ids, opts.grid, opts.search)
    check_sweep_name(name)
    plan = Plan(options=opts, configs=configs, run_ids=run_ids, name=name)
    check_gpus_for_tasks(plan)
    return plan


def check_gpus_for_tasks(plan: Plan) -> None:
    """DDP on CUDA puts one rank per GPU: refuse more tasks per node than GPUs before anything starts."""
    from .local import local_gpu_count

    s = plan.options.slurm
    for c in plan.configs:
        wants_cuda = c.device.startswith("cuda")
        if plan.executor == "slurm":
            if wants_cuda and s.gpus_per_node == 0:
                raise ConfigError(f"--device {c.device} on SLURM needs --gpus-per-node")
            if (wants_cuda or c.device == "auto") and 0 < s.gpus_per_node < s.tasks_per_node:
                raise ConfigError(
                    f"--tasks-per-node {s.tasks_per_node} > --gpus-per-node {s.gpus_per_node}: "
                    "DDP on CUDA runs one task per GPU"
                )
        elif s.tasks_per_node > 1:
            gpus = local_gpu_count()
            if (wants_cuda or (c.device == "auto" and gpus)) and s.tasks_per_node > gpus:
                raise ConfigError(
                    f"--tasks-per-node {s.tasks_per_node} with --device {c.device} needs "
                    f"{s.tasks_per_node} GPUs; this machine has {gpus}"
                )


def preflight(plan: Plan) -> None:
    """Everything checkable before anything is written or submitted: here, every config's device (the
    node checks its own under SLURM), the data; for SLURM the partition and node sizes; then that the
    results folder is writable (checked last: it creates the folder)."""
    from .data import DataError, prepare
    from .local import device_error_here
    from .results import check_writable_dir

    o = plan.options
    try:
        if plan.executor == "slurm":
            from .slurm import check_slurm_fits, sinfo_partitions

            check_slurm_fits(o.slurm, sinfo_partitions())
        else:
            for device in sorted({c.device for c in plan.configs}):
                if error := device_error_here(device):
                    raise LaunchError(error)
        prepare(o.data_dir)
        check_writable_dir(o.results_dir)
    except (OSError, DataError) as e:
        raise LaunchError(str(e)) from None
    # said here too, not only in the workers' logs: on such a mount two sweeps may train a run twice
    warn_if_claims_node_local(plan.folder)


def make_tasks(plan: Plan, run_ids: list[str]) -> tuple[list[TrainTask], list[list[str]]]:
    """One TrainTask per run, or per pack of runs (--pack N), and each task's runs among `run_ids`.

    A checkpointed pack may hold a run not in `run_ids` (completed, or training elsewhere, since it was
    checkpointed): the task carries it, trained along from the checkpoint but never written, so the
    others resume instead of restarting (TrainTask.carried).

    A pack is sized on the machine that trains it: here for the local executors; for SLURM the compute
    node checks it at run time (the login node may have no GPU, or another one)."""
    o = plan.options
    packs, wanted = plan.groups(run_ids), set(run_ids)
    if plan.executor != "slurm" and o.pack > 1:
        from .local import local_device_type
        from .packing import PackError, check_pack_fits

        for g in packs:
            cfg = plan.config(g[0])
            try:
                check_pack_fits(cfg, len(g), local_device_type(cfg.device))
            except PackError as e:
                raise LaunchError(str(e)) from None
    tasks = [
        TrainTask(
            configs=[plan.config(r).to_dict() for r in g],
            run_ids=list(g),
            carried=[r for r in g if r not in wanted],
            results_dir=str(plan.folder),
            data_dir=str(o.data_dir) if o.data_dir else None,
            extra={"sweep": plan.name},
            checkpoint_every=o.checkpoint_every,
            max_requeues=o.max_requeues,
            skip_completed=not o.force,
            fresh=o.force,  # --force: the job starts from scratch (its first attempt drops checkpoints)
        )
        for g in packs
    ]
    return tasks, [[r for r in g if r in wanted] for g in packs]


def slurm_executor_for(plan: Plan, *, dry_run: bool = False):
    from .slurm import slurm_executor

    o = plan.options
    return slurm_executor(
        plan.folder / LOG_DIR,
        plan.name,
        o.slurm,
        o.max_parallel,
        dry_run=dry_run,
        max_requeues=o.max_requeues,
    )


@dataclass(frozen=True)
class DryRun:
    groups: list[list[str]]  # the array's tasks, as submission would make them (carried runs too)
    resumed: list[list[str]]  # those of them a checkpoint resumes (Plan.resumed)
    todo: list[str]  # the runs to do; a task's others are carried (make_tasks)
    sbatch: str | None  # the script (SLURM), for the first array
    arrays: int  # how many arrays (MaxArraySize splits)
    max_array: int | None
    chains: int = 1  # the arrays run in this many chains (--max-parallel across arrays: array_chains)


def dry_run(plan: Plan, run_ids: list[str] | None = None) -> DryRun:
    """What submitting `run_ids` (default: all; the CLI gives Plan.todo's) would do, from the same
    code: the tasks (packs) and the exact sbatch text."""
    todo = plan.run_ids if run_ids is None else run_ids
    groups, resumed = plan.groups(todo), plan.resumed(todo)
    if plan.executor != "slurm" or not groups:
        return DryRun(groups, resumed, todo, None, 1, None)
    from .slurm import array_chains, max_array_size, sbatch_text

    limit = max_array_size()
    n = len(groups)
    per = min(n, limit) if limit else n
    sbatch = sbatch_text(slurm_executor_for(plan, dry_run=True), per)
    arrays = -(-n // per)
    chains = array_chains(arrays, per, plan.options.max_parallel)
    return DryRun(groups, resumed, todo, sbatch, arrays, limit, chains)


def _runs_info(
    plan: Plan, tasks: list[TrainTask], groups: list[list[str]], job_ids: list[str | None]
) -> dict[str, dict[str, Any]]:
    """The manifest's entry for each run a task trains for the sweep (not for a run it carries: that
    one's entry stays its own job's); `packed_with` is the whole pack, in its order, carried runs too.
    `executor` is the run's own (one folder may hold runs of local and SLURM sweeps); a local run's
    `host` is where its job id, a process, lives, and `sweep_process` the sweep that runs it there
    (`cancel` stops both)."""
    where: dict[str, Any] = {"executor": "slurm" if plan.executor == "slurm" else "local"}  # (debug: local)
    if plan.executor != "slurm":
        from .local import process_identity

        where.update(host=socket.gethostname(), sweep_process=process_identity())
    return {
        r: {
            "config": plan.config(r).to_dict(),
            "job_id": job_id,
            "packed_with": [x for x in t.run_ids if x != r],
            **where,
        }
        for t, g, job_id in zip(tasks, groups, job_ids)
        for r in g
    }


@dataclass(frozen=True)
class Submission:
    job_ids: list[str]
    runs: int
    tasks: int

    @property
    def arrays(self) -> list[str]:
        return sorted({j.split("_")[0] for j in self.job_ids})


def submit(
    plan: Plan, tasks: list[TrainTask], groups: list[list[str]], *, new_folder: bool | None = None
) -> Submission:
    """Submit to SLURM as job arrays; the manifest lists exactly what sbatch accepted. A refusal is a
    LaunchError naming sbatch's own message (and how many runs went in before); refused outright, a
    `new_folder` (sweepdir.submitting's word; default: it does not exist yet) is removed again."""
    from .slurm import max_array_size, submit_slurm

    ex = slurm_executor_for(plan)
    if new_folder is None:
        new_folder = not plan.folder.exists()
    try:
        chunks, error = submit_slurm(ex, tasks, max_array_size(), plan.options.max_parallel), None
    except LaunchError as e:
        chunks, error = e.done, e  # type: ignore[attr-defined]
        if not chunks and new_folder:  # refused outright: leave no trace (submitit's script)
            shutil.rmtree(plan.folder, ignore_errors=True)
    job_ids = [j for chunk in chunks for j in chunk]
    runs = _runs_info(plan, tasks, groups[: len(job_ids)], job_ids)
    if runs:
        record_submission(
            plan.folder, name=plan.name, executor="slurm", grid=plan.space,
            slurm=plan.options.slurm.to_dict(), runs=runs,
        )  # fmt: skip
    if error is not None:
        before = f" ({len(runs)} run(s) submitted before)" if runs else ""
        raise LaunchError(f"sbatch refused the submission: {error}{before}")
    return Submission(job_ids, len(runs), len(tasks))


def run_here(plan: Plan, tasks: list[TrainTask], groups: list[list[str]], on_event=None) -> list[str]:
    """Run the tasks on this machine (at most --max-parallel at once); the manifest records each job id
    as it starts. Returns each task's final state (COMPLETED / FAILED)."""
    from .local import run_local

    o = plan.options
    runs = _runs_info(plan, tasks, groups, [None] * len(groups))
    record_submission(plan.folder, name=plan.name, executor="local", grid=plan.space, slurm=None, runs=runs)

    def event(what: str, i: int, obj: Any) -> None:
        if what == "started" and plan.executor == "local":
            ids = {r: {**runs[r], "job_id": str(obj.job_id)} for r in groups[i]}
            record_submission(
                plan.folder, name=plan.name, executor="local", grid=plan.space, slurm=None, runs=ids,
                new_attempt=False,
            )  # fmt: skip
        if on_event is not None:
            on_event(what, i, obj)

    return run_local(
        plan.folder / LOG_DIR,
        tasks,
        max_parallel=local_parallel(o),
        tasks_per_node=o.slurm.tasks_per_node,
        on_event=event,
        executor_kind=plan.executor,
    )


def local_parallel(opts: SweepOptions) -> int:
    from .local import local_gpu_count

    return opts.max_parallel or max(1, local_gpu_count())


@dataclass(frozen=True)
class Cancelled:
    """What `cancel_sweep` did: SLURM jobs cancelled, local jobs told to stop, and the live runs it
    could not reach (`elsewhere`: run id -> the host whose process trains it; `unreachable`: a local
    job id with no such job on this machine any more); `sweeps`: the local sweep processes told to
    start no more runs (pids)."""

    slurm: list[str]
    local: list[str]
    elsewhere: dict[str, str]
    unreachable: list[str]
    sweeps: list[str]


def cancel_sweep(folder: Path) -> Cancelled:
    """Cancel every queued or running run of the sweep, each through its own backend: scancel for the
    SLURM ones; for local ones on this machine, SIGTERM to the job (local.stop_local_job: it
    checkpoints and stops, and the same sweep again resumes it), and SIGINT to the sweep process that
    runs them, so it starts none of the runs still waiting for a slot. A folder may hold both."""
    from .local import stop_local_job, stop_local_sweep
    from .slurm import cancel_jobs
    from .sweepdir import load_manifest, run_states

    rows = run_states(folder)
    here = socket.gethostname()
    waiting = [  # local runs without a result, on this machine: a sweep process may still start them
        r for r in rows if r["executor"] != "slurm" and r["host"] in (here, None) and r["sweep_process"]
        and (r["state"].live or r["state"] == "MISSING")
    ]  # fmt: skip
    ids = {r["run_id"] for r in waiting}
    sweeps = {r["sweep_process"] for r in waiting} | {  # and any other local sweep here given one of
        s["sweep_process"]  # them (two sweeps may share runs: a run's entry names the last one)
        for s in load_manifest(folder)["submissions"]
        if s.get("sweep_process") and s.get("host") in (here, None) and ids & set(s["runs"])
    }
    sweeps = [s.split("@", 1)[0] for s in sorted(sweeps) if stop_local_sweep(s)]
    live = [r for r in rows if r["job_id"] and r["state"].live]
    slurm = sorted({r["job_id"] for r in live if r["executor"] == "slurm"})
    local, elsewhere, unreachable = [], {}, []
    for job_id in sorted({r["job_id"] for r in live if r["executor"] != "slurm"}):
        hosts = {r["host"] for r in live if r["job_id"] == job_id}
        if hosts - {here, None}:
            elsewhere.update({r["run_id"]: r["host"] for r in live if r["job_id"] == job_id})
        elif stop_local_job(job_id, (folder / LOG_DIR).absolute()):
            local.append(job_id)
        else:
            unreachable.append(job_id)
    if slurm:
        try:
            cancel_jobs(slurm)
        except OSError as e:  # no scancel on this machine
            raise LaunchError(f"cannot cancel SLURM job(s) {', '.join(slurm)} from here: {e}") from None
    return Cancelled(slurm, local, elsewhere, unreachable, sweeps)
