"""Sweeps: grids, submitit executors (SLURM job arrays, the local machine), manifests, job states.

A sweep is a folder `<results_dir>/<name>/` holding `sweep.json` (the manifest: grid, run ids → job
ids, executor, SLURM parameters), one `<run_id>.json` result per run, and submitit's job folder
`logs/`. Run ids derive from the config, so running the same sweep again finds its earlier results.
No typer or rich here: the CLI renders what these functions return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
from submitit.helpers import Checkpointable

from .config import TRAIN_FIELDS, ConfigError, SlurmConfig, TrainConfig, option_name, parse_option
from .results import ResultError, atomic_write_json, git_info, load_result, utc_now

SWEEP_KIND = "mnist-jobs/sweep"
MANIFEST = "sweep.json"
LOG_DIR = "logs"
MAX_GRID = 10_000
DEFAULT_MAX_REQUEUES = 3


class LaunchError(RuntimeError):
    """Submission failed (sbatch refused, cluster unreachable...). The message is sbatch's own."""


# ---- the grid ----------------------------------------------------------------------------------


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
    allowed = set(TRAIN_FIELDS) | {"name", "slurm"}
    unknown = sorted(set(data) - allowed - {k.replace("-", "_") for k in allowed})
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {', '.join(unknown)}")
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


# ---- the job a worker runs ---------------------------------------------------------------------


@dataclass
class TrainTask(Checkpointable):
    """The picklable callable submitit runs: one run, or a pack of runs trained together.

    With several tasks (--tasks-per-node / --nodes), every task runs this; the process group comes
    from submitit's job environment and rank 0 alone writes the result.

    A submitit `Checkpointable`: on the time-limit / preemption signal (USR2) the run checkpoints at the
    next iteration boundary, then submitit calls `checkpoint()` and requeues the job, which resumes from
    that checkpoint (at most `max_requeues` times). On SIGTERM (scancel, `scontrol requeue`, preemption
    without a user signal) it checkpoints and exits; whatever SLURM starts again resumes likewise.
    Each run is claimed (an flock held while it trains), so two sweeps sharing a folder never train
    the same run at once, and a run completed elsewhere meanwhile is not trained again.
    """

    configs: list[dict[str, Any]]
    run_ids: list[str]
    results_dir: str
    data_dir: str | None = None
    threads: int | None = None
    master_port: int | None = None  # set for local multi-process jobs (a free port on this machine)
    extra: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int | None = None  # None: checkpoint.resolve_every's rule
    max_requeues: int = DEFAULT_MAX_REQUEUES
    requeues: int = 0  # requeues submitit made (checkpoint() counts them); SLURM_RESTART_COUNT too
    skip_completed: bool = True  # False with --force

    def __call__(self) -> list[dict[str, Any]]:
        import torch

        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0"))
        if threads:
            torch.set_num_threads(threads)
        dist = self.dist_info()
        with contextlib.ExitStack() as claims:
            todo, skipped = list(range(len(self.run_ids))), []
            if not dist.distributed:  # (DDP ranks cannot agree on a claim before their process group)
                todo, skipped = self._claim(claims)
            configs = [TrainConfig.from_dict(self.configs[i]) for i in todo]
            run_ids = [self.run_ids[i] for i in todo]
            records = self._train(configs, run_ids, dist) if configs else []
        done = [
            {"run_id": r["run_id"], "status": r["status"], "test_accuracy": r["metrics"].get("test_accuracy")}
            for r in records
        ]
        return done + skipped

    def _claim(self, claims: contextlib.ExitStack) -> tuple[list[int], list[dict[str, Any]]]:
        """Claim this task's runs; the ones another process holds, or that are completed by now, are
        skipped (and reported as such)."""
        folder = Path(self.results_dir)
        todo, skipped = [], []
        for i, run_id in enumerate(self.run_ids):
            if not claims.enter_context(claim_run(folder, run_id)):
                skipped.append({"run_id": run_id, "status": RUNNING_ELSEWHERE, "test_accuracy": None})
                continue
            status, data = result_status(folder, run_id)
            if status == "completed" and self.skip_completed:
                acc = data["metrics"].get("test_accuracy") if data else None
                skipped.append({"run_id": run_id, "status": COMPLETED_ELSEWHERE, "test_accuracy": acc})
                continue
            todo.append(i)
        return todo, skipped

    def _train(self, configs: list[TrainConfig], run_ids: list[str], dist) -> list[dict[str, Any]]:
        """One run or a pack (the same loop), with the stop signals routed to it (it checkpoints, then
        stops)."""
        from .train import Interrupted, StopFlag, train_pack

        stop = StopFlag()
        with _signals_set(stop, (signal.SIGUSR2, signal.SIGTERM)) as previous:
            try:
                return train_pack(
                    configs,
                    results_dir=self.results_dir,
                    run_ids=run_ids,
                    data_dir=self.data_dir,
                    extra=self.extra,
                    dist=dist,
                    checkpoint_every=self.checkpoint_every,
                    stop=stop,
                    requeues=self.requeue_count(),
                    max_requeues=self.max_requeues,
                )
            except Interrupted as e:
                submitit_handler = previous.get(signal.SIGUSR2)
                if e.signum != signal.SIGUSR2 or not callable(submitit_handler) or not dist.is_main:
                    raise  # SIGTERM: SLURM requeues or cancels the job itself; the checkpoint is on disk
                if self.requeue_count() >= self.max_requeues:
                    _write_failed(e, self)  # no requeue left: the run ends failed, and says why
                # submitit's own handler: calls self.checkpoint(), requeues the job and exits (or, with
                # no requeue left, raises UncompletedJobError so the job ends failed)
                submitit_handler(signal.SIGUSR2, None)
                raise

    def requeue_count(self) -> int:
        restarts = os.environ.get("SLURM_RESTART_COUNT", "") if _under_slurm() else ""
        return max(self.requeues, int(restarts) if restarts.isdigit() else 0)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's hook (from its USR2 handler): the job to requeue, or None (no requeue) once
        `max_requeues` is spent. The run's own checkpoint file was written before this is called."""
        from submitit.helpers import DelayedSubmission

        done = self.requeue_count()
        if done >= self.max_requeues:
            return None
        return DelayedSubmission(dataclasses.replace(self, requeues=done + 1))

    def dist_info(self):
        """Rank, world size and rendezvous from the submitit job environment (SLURM or local)."""
        import submitit

        from .device import SINGLE, DistInfo

        try:
            job_env = submitit.JobEnvironment()
        except RuntimeError:  # not inside a submitit job (called directly)
            return SINGLE
        if job_env.num_tasks <= 1:
            return SINGLE
        if self.master_port:
            os.environ["MASTER_PORT"] = str(self.master_port)
        env = submitit.helpers.TorchDistributedEnvironment()
        local = os.environ.get("SUBMITIT_EXECUTOR") == "local"
        return DistInfo(
            rank=env.rank,
            local_rank=env.local_rank,
            world_size=env.world_size,
            local_world_size=env.local_world_size,
            nodes=job_env.num_nodes,
            master_addr="127.0.0.1" if local else env.master_addr,
            master_port=env.master_port,
        )


RUNNING_ELSEWHERE = "running elsewhere"  # what a task reports for a run it left to another process
COMPLETED_ELSEWHERE = "completed elsewhere"  # ... and for one completed by another process meanwhile


def _under_slurm() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def _write_failed(e, task: TrainTask) -> None:
    """The failed records of runs stopped by a time limit / preemption with no requeue left."""
    message = (
        f"stopped at iteration {e.iteration} by a time limit or preemption after {task.requeue_count()} "
        f"requeue(s) (--max-requeues {task.max_requeues}); its checkpoint is kept: "
        "`mnist-jobs sweep ... --retry-failed` resumes it"
    )
    for rec in e.records:
        record = dict(rec)
        record["status"] = "failed"
        record["error"] = {"type": "RequeueLimit", "message": message, "traceback": None}
        record.pop("result_path", None)
        atomic_write_json(Path(task.results_dir) / f"{record['run_id']}.json", record)


@contextlib.contextmanager
def _signals_set(stop, signums: tuple[int, ...]) -> Iterator[dict[int, Any]]:
    """While the block runs, these signals only ask the training loop to stop (`stop.request`); the
    previous handlers (submitit's) are restored after, and handed to the block."""
    if threading.current_thread() is not threading.main_thread():
        yield {}
        return
    previous = {s: signal.signal(s, lambda signum, frame: stop.request(signum)) for s in signums}
    try:
        yield previous
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def claim_run(folder: Path, run_id: str) -> Iterator[bool]:
    """Try to claim a run for this process: an exclusive, non-blocking flock on `.<run_id>.lock` in the
    sweep folder, held for the block (released by the kernel if the process dies, even by kill -9).
    Yields False when another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{run_id}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_is_claimed(folder: Path, run_id: str) -> bool:
    """Whether some process is training this run right now (holds its claim). Creates nothing."""
    path = folder / f".{run_id}.lock"
    try:
        f = open(path)  # noqa: SIM115 - closed below
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


# ---- executors ---------------------------------------------------------------------------------


def slurm_executor(
    folder: Path,
    name: str,
    slurm: SlurmConfig,
    max_parallel: int | None,
    *,
    dry_run: bool = False,
    max_requeues: int = DEFAULT_MAX_REQUEUES,
):
    """submitit's SlurmExecutor with our parameters. `dry_run` works without SLURM installed (to print
    the sbatch script on a laptop); otherwise a machine without srun is a LaunchError.

    USR2 comes `signal_delay_s` before the time limit (60 s, or a quarter of very short limits) and
    submitit requeues a timed-out job at most `max_requeues` times (its max_num_timeout); TrainTask
    applies the same bound to preemptions, which submitit alone would requeue without limit."""
    import submitit

    cls = _DryRunSlurmExecutor() if dry_run else submitit.SlurmExecutor
    try:
        ex = cls(folder=folder, max_num_timeout=max_requeues)
    except RuntimeError as e:  # submitit: 'Could not detect "srun"'
        raise LaunchError(
            f"SLURM not found on this machine ({e}); submit from a login node, or drop the SLURM "
            "options to run here"
        ) from None
    params: dict[str, Any] = {
        "job_name": name,
        "time": slurm.time_min,
        "nodes": slurm.nodes,
        "ntasks_per_node": slurm.tasks_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "signal_delay_s": min(60, max(10, slurm.time_min * 15)),
        "stderr_to_stdout": False,
    }
    optional = {
        "partition": slurm.partition,
        "account": slurm.account,
        "qos": slurm.qos,
        "constraint": slurm.constraint,
        "gpus_per_node": slurm.gpus_per_node or None,
        "mem": _sbatch_mem(slurm.mem_gb),
        "exclusive": True if slurm.exclusive else None,
        "setup": list(slurm.setup) or None,
        "additional_parameters": dict(slurm.slurm_opts) or None,
        "array_parallelism": max_parallel,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    ex.update_parameters(**params)
    return ex


def _sbatch_mem(mem_gb: float | None) -> str | None:
    """sbatch --mem with a unit (a bare number would mean megabytes)."""
    if mem_gb is None:
        return None
    return f"{int(mem_gb)}G" if float(mem_gb).is_integer() else f"{round(mem_gb * 1024)}M"


def _DryRunSlurmExecutor():  # a class factory, so submitit is imported lazily
    import submitit

    class DryRunSlurmExecutor(submitit.SlurmExecutor):
        """Renders the same sbatch text; skips submitit's check that srun exists."""

        @classmethod
        def affinity(cls) -> int:
            return 1

    return DryRunSlurmExecutor


def sbatch_text(executor, n_tasks: int) -> str:
    """The exact sbatch script submitit writes for an array of n_tasks (or one job)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = dict(executor.parameters)
    if n_tasks > 1:
        params["map_count"] = n_tasks
    return _make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder, **params)


def max_array_size() -> int | None:
    """MaxArraySize from `scontrol show config` (None when scontrol is unavailable)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize":
            with contextlib.suppress(ValueError):
                return int(value.strip())
    return None


def chunks(items: list[Any], size: int | None) -> list[list[Any]]:
    if not size or size <= 0:
        return [items]
    return [items[i : i + size] for i in range(0, len(items), size)]


def submit_slurm(executor, tasks: list[TrainTask], max_array: int | None) -> list[list[str]]:
    """Submit tasks as job arrays (split to fit MaxArraySize); return job ids per chunk.

    Each array element is the TrainTask itself (submit_array), so submitit sees a Checkpointable and
    requeues it on timeout / preemption. Raises LaunchError with sbatch's message; chunks already
    submitted are returned in `.done`.
    """
    from submitit.core.utils import FailedJobError

    submitted: list[list[str]] = []
    for group in chunks(tasks, max_array):
        try:
            if len(group) == 1:
                jobs = [executor.submit(group[0])]
            else:
                jobs = executor.submit_array(group)
        except (FailedJobError, subprocess.CalledProcessError, OSError) as e:
            err = LaunchError(_sbatch_message(e))
            err.done = submitted  # type: ignore[attr-defined]
            raise err from None
        submitted.append([j.job_id for j in jobs])
    return submitted


def _sbatch_message(e: BaseException) -> str:
    text = str(e)
    for line in text.splitlines():
        if "sbatch: error" in line:
            return line.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


# ---- preflight: will SLURM take these jobs? ----------------------------------------------------


@dataclass(frozen=True)
class NodeGroup:
    """One `sinfo` line: `count` nodes of a partition with these resources."""

    partition: str
    default: bool
    cpus: int
    mem_mb: int
    gpus: int
    count: int


def _leading_int(text: str) -> int:
    digits = ""
    for ch in text.strip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else 0


def _gres_gpus(gres: str) -> int:
    """GPUs per node from sinfo's %G: 'gpu:2', 'gpu:a100:4(S:0-1)', 'gpu:2,mps:100' or '(null)'."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2:
            total += _leading_int(parts[-1])
    return total


def sinfo_partitions() -> list[NodeGroup]:
    """The cluster's partitions and node sizes from `sinfo`; LaunchError when SLURM is not there."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        raise LaunchError(
            "SLURM not found on this machine (no sbatch/sinfo on PATH): is this a SLURM login node? "
            "Submit from one, or drop the SLURM options to run here"
        )
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%P|%c|%m|%G|%D"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(f"sinfo failed: {e}") from None
    if out.returncode != 0:
        lines = [ln.strip() for ln in (out.stderr or out.stdout).splitlines() if ln.strip()]
        raise LaunchError(f"sinfo failed: {lines[-1] if lines else f'exit code {out.returncode}'}")
    groups = []
    for line in out.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        name, cpus, mem, gres, count = fields
        groups.append(
            NodeGroup(
                partition=name.rstrip("*"),
                default=name.endswith("*"),
                cpus=_leading_int(cpus),
                mem_mb=_leading_int(mem),
                gpus=_gres_gpus(gres),
                count=_leading_int(count),
            )
        )
    return groups


def check_slurm_fits(slurm: SlurmConfig, groups: list[NodeGroup]) -> None:
    """Raise LaunchError (a clear sentence) unless the partition exists and has `slurm.nodes` nodes
    with enough GPUs, CPUs (cpus-per-task x tasks-per-node) and memory for one job."""
    known = sorted({g.partition for g in groups})
    if slurm.partition:
        wanted = [p.strip() for p in slurm.partition.split(",") if p.strip()]
        missing = [p for p in wanted if p not in known]
        if missing:
            raise LaunchError(
                f"partition {missing[0]!r} does not exist on this cluster (sinfo lists: "
                f"{', '.join(known) or 'none'})"
            )
    else:
        wanted = [g.partition for g in groups if g.default][:1]
        if not wanted:
            raise LaunchError(
                f"this cluster has no default partition: pick one with --partition ({', '.join(known)})"
            )
    nodes = [g for g in groups if g.partition in wanted]
    cpus = slurm.cpus_per_task * slurm.tasks_per_node
    mem_mb = slurm.mem_gb * 1024 if slurm.mem_gb is not None else 0
    fit = [g for g in nodes if g.gpus >= slurm.gpus_per_node and g.cpus >= cpus and g.mem_mb >= mem_mb]
    if sum(g.count for g in fit) >= slurm.nodes:
        return
    where = f"partition {'/'.join(wanted)}"
    if not nodes:
        raise LaunchError(f"{where} has no nodes")
    if max(g.gpus for g in nodes) < slurm.gpus_per_node:
        raise LaunchError(
            f"--gpus-per-node {slurm.gpus_per_node} does not fit: nodes of {where} have at most "
            f"{max(g.gpus for g in nodes)} GPU(s)"
        )
    if max(g.cpus for g in nodes) < cpus:
        raise LaunchError(
            f"--cpus-per-task {slurm.cpus_per_task} x --tasks-per-node {slurm.tasks_per_node} = {cpus} CPUs "
            f"does not fit: nodes of {where} have at most {max(g.cpus for g in nodes)}"
        )
    if max(g.mem_mb for g in nodes) < mem_mb:
        raise LaunchError(
            f"--mem-gb {slurm.mem_gb:g} does not fit: nodes of {where} have at most "
            f"{max(g.mem_mb for g in nodes) / 1024:.1f} GB"
        )
    raise LaunchError(
        f"--nodes {slurm.nodes} does not fit: {where} has {sum(g.count for g in fit)} node(s) with "
        "the GPUs, CPUs and memory asked for"
    )


# ---- local execution with a concurrency cap ----------------------------------------------------


def local_gpu_count() -> int:
    """GPUs this machine would give jobs (without importing torch in the parent)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"])
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
            return len([ln for ln in out.stdout.splitlines() if ln.startswith("GPU ")])
    return 0


def run_local(
    folder: Path,
    tasks: list[TrainTask],
    *,
    max_parallel: int,
    tasks_per_node: int = 1,
    timeout_min: int = 24 * 60,
    on_event: Callable[[str, int, Any], None] | None = None,
    executor_kind: str = "local",
) -> list[str]:
    """Run tasks on this machine through submitit's LocalExecutor, at most `max_parallel` at once,
    each concurrent job on its own GPU when there are several. Blocks until all are done; returns
    the final state of each task ('COMPLETED' / 'FAILED')."""
    import submitit

    gpus = local_gpu_count()
    slots = list(range(max(1, min(max_parallel, len(tasks)))))  # (a huge --max-parallel is fine)
    pending = list(enumerate(tasks))
    running: dict[int, tuple[Any, int]] = {}
    states = ["PENDING"] * len(tasks)
    cpu_threads = max(1, (os.cpu_count() or 1) // max(1, max_parallel * tasks_per_node))

    def start(i: int, task: TrainTask, slot: int) -> None:
        if executor_kind == "debug":
            ex = submitit.DebugExecutor(folder=folder)
        else:
            ex = submitit.LocalExecutor(folder=folder)
            params: dict[str, Any] = {"timeout_min": timeout_min, "tasks_per_node": tasks_per_node}
            if gpus:
                per_job = max(1, gpus // max_parallel)
                first = (slot * per_job) % gpus
                params.update(gpus_per_node=per_job, visible_gpus=tuple(range(first, first + per_job)))
            ex.update_parameters(**params)
        if task.threads is None and not gpus:
            task.threads = cpu_threads
        if tasks_per_node > 1 and task.master_port is None:
            from .device import free_port

            task.master_port = free_port()
        job = ex.submit(task)
        for j in (job, *job._sub_jobs):
            # A local job's result is on this disk before its process exits, so there is no network
            # filesystem to wait for: without this, submitit waits 15 s (twice: our state check, then
            # the caller's) for the result of a worker that was killed and will never write one.
            j._results_timeout_s = 0
        running[i] = (job, slot)
        states[i] = "RUNNING"
        if on_event:
            on_event("started", i, job)

    try:
        while pending or running:
            while pending and slots:
                i, task = pending.pop(0)
                start(i, task, slots.pop(0))
            time.sleep(0.2)
            for i, (job, slot) in list(running.items()):
                if executor_kind == "debug" or job.done():
                    try:
                        job.results()  # every task's (DDP ranks); raises if any failed
                        states[i] = "COMPLETED"
                    except Exception as e:
                        states[i] = "FAILED"
                        if on_event:
                            on_event("error", i, e)
                    del running[i]
                    slots.append(slot)
                    if on_event:
                        on_event("finished", i, job)
    except BaseException:
        for job, _ in running.values():
            with contextlib.suppress(Exception):
                job.cancel(check=False)
        raise
    return states


# ---- the manifest ------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the sweep folder for read-modify-write of the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == SWEEP_KIND else None


def record_submission(
    folder: Path,
    *,
    name: str,
    executor: str,
    grid: dict[str, list[Any]],
    slurm: dict[str, Any] | None,
    runs: dict[str, dict[str, Any]],
    new_attempt: bool = True,
) -> dict[str, Any]:
    """Merge newly submitted runs into the manifest (under the folder lock) and write it atomically.
    `new_attempt=False` only updates run info (e.g. the job id a local run got when it started)."""
    with locked(folder):
        manifest = read_manifest(folder) or {
            "kind": SWEEP_KIND,
            "schema_version": 1,
            "name": name,
            "created_at": utc_now(),
            "runs": {},
            "submissions": [],
        }
        now = utc_now()
        manifest.update(executor=executor, grid=grid, slurm=slurm, updated_at=now, **git_info())
        if new_attempt:  # each submission keeps its own grid: concurrent sweeps lose nothing
            manifest["submissions"].append(
                {"at": now, "executor": executor, "grid": grid, "runs": sorted(runs)}
            )
        for run_id, info in runs.items():
            old = manifest["runs"].get(run_id, {})
            if new_attempt:
                info = {**info, "submitted_at": now, "attempts": old.get("attempts", 0) + 1}
            manifest["runs"][run_id] = {**old, **info}
        atomic_write_json(folder / MANIFEST, manifest)
        return manifest


def list_sweeps(results_dir: Path) -> list[Path]:
    if not results_dir.is_dir():
        return []
    return sorted(p.parent for p in results_dir.glob(f"*/{MANIFEST}"))


# ---- what is done, what is left ----------------------------------------------------------------


def result_status(folder: Path, run_id: str) -> tuple[str | None, dict[str, Any] | None]:
    """('completed' | 'failed' | 'running' | None, data) from the run's result file."""
    path = folder / f"{run_id}.json"
    if not path.exists():
        return None, None
    try:
        data = load_result(path).data
    except ResultError:
        return None, None
    return data["status"], data


TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


def scheduler_states(job_ids: list[str]) -> dict[str, str] | None:
    """SLURM state per job id (array task ids like 12_3): sacct, else squeue; None if neither works."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    states: dict[str, str] = {}
    try:
        out = subprocess.run(
            [
                "sacct",
                "-n",
                "-P",
                "-X",
                "-o",
                "JobID,State",
                "-j",
                ",".join(sorted({i.split("_")[0] for i in ids})),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0:
            for line in out.stdout.splitlines():
                jid, _, state = line.partition("|")
                states[jid.strip()] = state.split()[0] if state.strip() else "UNKNOWN"
            # an array still queued shows as 12_[0-3%2] in sacct: expand for our ids
            for jid in ids:
                if jid not in states:
                    base = jid.split("_")[0]
                    for key, st in list(states.items()):
                        if key.startswith(f"{base}_[") or key == base:
                            states[jid] = st
            return {j: states.get(j, "UNKNOWN") for j in ids}
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # no accounting: squeue knows only live jobs
        out = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    live = dict(line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)
    return {j: live.get(j, "GONE") for j in ids}


def plan_runs(
    folder: Path, run_ids: list[str], *, retry_failed: bool, force: bool, executor: str
) -> tuple[list[str], dict[str, list[str]]]:
    """Which runs to submit, and the skipped ones by reason ('completed', 'failed', 'queued', 'running':
    training right now in another process, e.g. a concurrent `sweep` into the same folder)."""
    skipped: dict[str, list[str]] = {"completed": [], "failed": [], "queued": [], "running": []}
    if force:
        return list(run_ids), skipped
    manifest = read_manifest(folder) or {"runs": {}}
    candidates: list[str] = []
    for run_id in run_ids:
        status, _ = result_status(folder, run_id)
        if run_is_claimed(folder, run_id):
            skipped["running"].append(run_id)
        elif status == "completed":
            skipped["completed"].append(run_id)
        elif status == "failed" and not retry_failed:
            skipped["failed"].append(run_id)
        else:
            candidates.append(run_id)
    if executor == "slurm":
        jobs = {r: manifest["runs"].get(r, {}).get("job_id") for r in candidates}
        states = scheduler_states([j for j in jobs.values() if j]) or {}
        for run_id, job_id in jobs.items():
            if job_id and states.get(job_id, "GONE") not in TERMINAL | {"GONE", "UNKNOWN"}:
                skipped["queued"].append(run_id)
        candidates = [r for r in candidates if r not in skipped["queued"]]
    return candidates, skipped


def run_states(folder: Path) -> list[dict[str, Any]]:
    """One row per run of a sweep: run id, config, job id, state, accuracy."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise ConfigError(f"{folder} is not a sweep folder (no {MANIFEST})")
    runs = manifest["runs"]
    sched = None
    if manifest.get("executor") == "slurm":
        sched = scheduler_states([r.get("job_id") for r in runs.values() if r.get("job_id")])
    rows = []
    for run_id, info in runs.items():
        status, data = result_status(folder, run_id)
        job_id = info.get("job_id")
        state = (sched or {}).get(job_id) if job_id else None
        # A result older than the run's latest submission (--retry-failed, --force) is history: the
        # new job's state counts, even before sacct lists it.
        stale = (
            sched is not None
            and data is not None
            and (info.get("submitted_at") or "") > (data.get("finished_at") or "~")
        )
        if stale:
            status, data = None, None
        if status in ("completed", "failed"):
            shown = status.upper()
            if status == "failed" and state in ("PENDING", "RUNNING", "REQUEUED"):
                shown = state  # resubmitted after a failure, going again
        elif state and state not in ("GONE", "UNKNOWN"):
            shown = "FAILED" if state in TERMINAL and state != "COMPLETED" else state
            if state == "COMPLETED":
                shown = "FAILED"  # finished without writing a result
        elif status == "running" or (status is None and run_is_claimed(folder, run_id)):
            shown = "RUNNING"
        elif stale:
            shown = "PENDING"  # submitted a moment ago, not in sacct yet
        elif sched is None and manifest.get("executor") == "slurm":
            shown = "UNKNOWN"
        else:
            shown = "PENDING" if manifest.get("executor") == "slurm" and state != "GONE" else "MISSING"
        acc = data["metrics"].get("test_accuracy") if data else None
        rows.append(
            {
                "run_id": run_id,
                "config": info.get("config", {}),
                "job_id": job_id,
                "state": shown,
                "test_accuracy": acc,
                "error": (data or {}).get("error", {}) and data["error"].get("message"),
            }
        )
    return rows


def log_paths(folder: Path, job_id: str) -> tuple[Path, Path]:
    from submitit.core.utils import JobPaths

    paths = JobPaths(folder / LOG_DIR, job_id=job_id, task_id=0)
    return paths.stdout, paths.stderr


def cancel_jobs(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=False, capture_output=True, timeout=30)
