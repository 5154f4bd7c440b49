"""The SLURM backend (login node): submitit's SlurmExecutor with our parameters, the sbatch text, job
arrays split by MaxArraySize, the `sinfo` preflight, job states from sacct / squeue, scancel.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import SlurmConfig
from .job import DEFAULT_MAX_REQUEUES, TrainTask


class LaunchError(RuntimeError):
    """Submission failed (sbatch refused, cluster unreachable...). The message is sbatch's own."""


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
        "signal_delay_s": min(60, max(10, slurm.time_min * 15)),
        "stderr_to_stdout": False,
        **slurm.submitit_parameters(),
    }
    if max_parallel is not None:
        params["array_parallelism"] = max_parallel
    ex.update_parameters(**params)
    return ex


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


def array_chains(n_arrays: int, per_array: int, max_parallel: int | None) -> int:
    """How many chains a sweep's arrays (split to fit MaxArraySize) run in so that --max-parallel N
    bounds the tasks running in all of them at once: each array runs at most min(N, its size) at
    once (`%`), and array k waits (afterany) for array k - chains. Without N, all run at once."""
    if not max_parallel or n_arrays <= 1:
        return max(1, n_arrays)
    return max(1, max_parallel // min(max_parallel, per_array))


def submit_slurm(
    executor, tasks: list[TrainTask], max_array: int | None, max_parallel: int | None = None
) -> list[list[str]]:
    """Submit tasks as job arrays (split to fit MaxArraySize, chained so that at most `max_parallel`
    tasks of them all run at once: `array_chains`); return job ids per chunk.

    Each array element is the TrainTask itself (submit_array), so submitit sees a Checkpointable and
    requeues it on timeout / preemption. Raises LaunchError with sbatch's message; chunks already
    submitted are returned in `.done`.
    """
    from submitit.core.utils import FailedJobError

    submitted: list[list[str]] = []
    groups = chunks(tasks, max_array)
    chains = array_chains(len(groups), len(groups[0]), max_parallel)
    for k, group in enumerate(groups):
        after = submitted[k - chains][0].split("_")[0] if k >= chains else None
        executor.update_parameters(dependency=f"afterany:{after}" if after else None)
        try:
            # submitit prints a failing sbatch's stderr too: its one line of it is the error's
            with contextlib.redirect_stderr(io.StringIO()):
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
    """The line of sbatch's stderr that says what is wrong: its `sbatch: error: ...`, else its first
    (`sbatch: unrecognized option ...`), never the `Try "sbatch --help"` after it."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for line in lines:
        if "sbatch: error" in line:
            return line
    lines = [ln for ln in lines if not ln.startswith("Try ")]
    return lines[0] if lines else type(e).__name__


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
    """SLURM state per job id (array task ids like 12_3): sacct, else squeue; None if neither works.

    sacct's output is parsed by submitit's own reader (`SlurmInfoWatcher.read_info`), which also expands
    an array that is still queued (`12_[0-3%2]`) into its tasks."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    try:
        from submitit.slurm.slurm import SlurmInfoWatcher

        out = subprocess.run(
            [
                "sacct",
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
            info = SlurmInfoWatcher().read_info(out.stdout)
            states = {j: (stats.get("State") or "UNKNOWN").split()[0] for j, stats in info.items()}
            found = {j: states.get(j, states.get(j.split("_")[0], "UNKNOWN")) for j in ids}
            # a job SLURM has just requeued (node failure, preemption) is still listed by sacct as its
            # last attempt ended (NODE_FAIL...) until the next one starts: the queue knows better
            return {**found, **{j: s for j, s in (_squeue_states() or {}).items() if j in found}}
    except (OSError, subprocess.SubprocessError):
        pass
    live = _squeue_states()  # no accounting: squeue knows only live jobs
    if live is None:
        return None
    return {j: live.get(j, "GONE") for j in ids}


def _squeue_states() -> dict[str, str] | None:
    """The state of every job in the queue (array tasks one by one), or None if squeue fails."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return dict(line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)


def job_histories(job_ids: list[str]) -> dict[str, list[dict[str, str]]]:
    """Every attempt of each job, oldest first (`sacct -D`: a requeued job's earlier attempts too, e.g.
    NODE_FAIL then RUNNING), each with its state and node list; {} when sacct does not answer."""
    ids = sorted({j.split("_")[0] for j in job_ids if j})
    if not ids or shutil.which("sacct") is None:
        return {}
    try:
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-D", "-o", "JobID,State,NodeList", "-j", ",".join(ids)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    history: dict[str, list[dict[str, str]]] = {}
    for line in out.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 3 or not fields[1]:
            continue
        job, state, nodes = fields
        history.setdefault(job, []).append({"state": state.split()[0], "nodes": nodes})
    return history


def attempts_note(attempts: list[dict[str, str]]) -> str:
    """What happened to a job before its current attempt, for `status`: e.g. 'NODE_FAIL on mjnode[1-2],
    requeued'. Empty for a job that ran once."""
    earlier = attempts[:-1]
    if not earlier:
        return ""
    notes = []
    for a in earlier:
        where = f" on {a['nodes']}" if a["nodes"] and a["nodes"] != "None assigned" else ""
        notes.append(f"{a['state']}{where}")
    return f"{', '.join(notes)}; requeued {len(earlier)}x"


def cancel_jobs(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=False, capture_output=True, timeout=30)
