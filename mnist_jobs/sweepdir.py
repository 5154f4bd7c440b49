"""The sweep folder, `<results_dir>/<name>/`: the one owner of its format.

It holds `sweep.json` (the manifest: grid, run ids -> job ids, executor, SLURM parameters, submissions),
one `<run_id>.json` result per run (results.py owns that format), checkpoints, claims
(`.<run_id>.lock`, claims.py owns them: the job on a compute node takes them) and submitit's job folder
`logs/`. `status`, `cancel`, `logs`, `report` and the launch code all read it through this module.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .checkpoint import checkpoint_path, population_path
from .claims import claim_holder, read_progress, result_status, run_is_claimed
from .config import ConfigError
from .results import atomic_write_json, git_info, utc_now

SWEEP_KIND = "mnist-jobs/sweep"


MANIFEST = "sweep.json"
MANIFEST_VERSION = 1


LOG_DIR = "logs"


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


@contextlib.contextmanager
def submitting(folder: Path) -> Iterator[bool]:
    """One submission at a time into a sweep folder, from planning its runs (plan_runs) to recording
    its jobs (record_submission), so that a `sweep` of the same runs started meanwhile sees them
    queued instead of submitting them again. Yields whether the folder is new (a submission refused
    outright removes it again). Its own lock file: record_submission takes `locked` inside."""
    new = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".submit.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield new
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ManifestError(ConfigError):
    """A sweep.json that is there but is not a manifest this version can read (corrupt, foreign)."""


def manifest_path(folder: Path) -> Path:
    return folder / MANIFEST


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest; None when it has no sweep.json; ManifestError (one sentence naming the
    file and what is wrong with it) when its sweep.json is unreadable, corrupt or not a sweep's."""
    path = manifest_path(folder)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(
            f"{path} is corrupt (not JSON: {e}); move it away to start the sweep anew"
        ) from None
    if not isinstance(data, dict) or data.get("kind") != SWEEP_KIND:
        kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise ManifestError(f"{path} is not an mnist-jobs sweep manifest (kind {kind!r})")
    if not isinstance(data.get("runs"), dict) or not isinstance(data.get("submissions", []), list):
        raise ManifestError(f"{path} is damaged (no 'runs' table)")
    version = data.get("schema_version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise ManifestError(f"{path}: schema_version {version!r} is newer than this mnist-jobs reads")
    return data


def scan(root: Path | str) -> tuple[list[Path], list[Path]]:
    """(result files, sweep manifests) under root, sorted, in one walk: every *.json but dotfiles
    (temp files, claims) and `sweep.json`, which is the manifest. `report` reads a tree through this."""
    root = Path(root)
    if root.is_file():
        return ([], [root]) if root.name == MANIFEST else ([root], [])
    found: list[Path] = []
    manifests: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.endswith(".json") and not name.startswith("."):
                (manifests if name == MANIFEST else found).append(Path(dirpath) / name)
    return sorted(found), sorted(manifests)


def load_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a folder that must be a sweep (ManifestError otherwise)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise ManifestError(f"no sweep in {folder} (no {MANIFEST})")
    return manifest


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
            "schema_version": MANIFEST_VERSION,
            "name": name,
            "created_at": utc_now(),
            "runs": {},
            "submissions": [],
        }
        now = utc_now()
        manifest.update(executor=executor, grid=grid, slurm=slurm, updated_at=now, **git_info())
        if new_attempt:  # each submission keeps its own grid: concurrent sweeps lose nothing
            entry = {"at": now, "executor": executor, "grid": grid, "runs": sorted(runs)}
            # a local sweep's process (and host): `cancel` stops every one still running, also
            # when a concurrent sweep recorded its own over some runs' entries
            for key in ("host", "sweep_process"):
                if values := sorted({str(i[key]) for i in runs.values() if i.get(key)}):
                    entry[key] = values[0]
            manifest["submissions"].append(entry)
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


def run_executor(manifest: dict[str, Any], info: dict[str, Any]) -> str | None:
    """Where a run was last sent, 'slurm' or 'local': its own entry's word (one folder may hold runs
    of both); a manifest written before runs recorded it has one for the whole sweep."""
    return info.get("executor") or manifest.get("executor")


def plan_runs(
    folder: Path, run_ids: list[str], *, retry_failed: bool, force: bool
) -> tuple[list[str], dict[str, list[str]]]:
    """Which runs to submit, and the skipped ones by reason ('completed', 'failed', 'queued', 'running':
    training right now in another process, e.g. a concurrent `sweep` into the same folder). `force`
    submits completed and failed runs again, never one that is queued or training: it would only
    wait for the claim, and lose track of the job that has it."""
    skipped: dict[str, list[str]] = {"completed": [], "failed": [], "queued": [], "running": []}
    manifest = read_manifest(folder) or {"runs": {}}
    candidates: list[str] = []
    for run_id in run_ids:
        status = None if force else result_status(folder, run_id)[0]
        if run_is_claimed(folder, run_id):
            skipped["running"].append(run_id)
        elif status == "completed":
            skipped["completed"].append(run_id)
        elif status == "failed" and not retry_failed:
            skipped["failed"].append(run_id)
        else:
            candidates.append(run_id)
    recorded = manifest["runs"]
    jobs = {
        r: recorded[r].get("job_id")
        for r in candidates
        if r in recorded and run_executor(manifest, recorded[r]) == "slurm"
    }  # (whatever executor this sweep uses: a run still queued on SLURM is not sent again)
    if any(jobs.values()):
        from .slurm import TERMINAL, scheduler_states

        states = scheduler_states([j for j in jobs.values() if j]) or {}
        for run_id, job_id in jobs.items():
            if job_id and states.get(job_id, "GONE") not in TERMINAL | {"GONE", "UNKNOWN"}:
                skipped["queued"].append(run_id)
        candidates = [r for r in candidates if r not in skipped["queued"]]
    return candidates, skipped


def resumable_packs(folder: Path, run_ids: list[str], carriable: Iterable[str] = ()) -> list[list[str]]:
    """The tasks among `run_ids` that a checkpoint in `folder` resumes, each in its checkpoint's order:
    a pack the manifest last recorded (`packed_with`) whose `pack-<hash>.ckpt.pt` is there, and a run
    with a lone checkpoint of its own. A pack checkpoint holds its models stacked, so only the same
    pack, in the same order, can load it: the planner keeps these together whatever --pack says now.

    A pack member that is not in `run_ids` (completed, failed, or training elsewhere) but is in
    `carriable` (the sweep's grid) is carried: the task trains it along from the checkpoint and writes
    nothing for it (job.TrainTask's `carried`), so the others need not restart. A pack with a member
    in neither is not resumable."""
    recorded = (read_manifest(folder) or {}).get("runs", {})
    wanted, taken = set(run_ids), set()
    allowed = wanted | set(carriable)
    tasks: list[list[str]] = []
    for run_id in run_ids:
        if run_id in taken:
            continue
        others = list(recorded.get(run_id, {}).get("packed_with") or [])
        if others and all(o in allowed and o not in taken for o in others):
            # packed_with is the pack's order less this run: its place is one of len(others) + 1
            for i in range(len(others) + 1):
                members = [*others[:i], run_id, *others[i:]]
                if population_path(folder, members).exists():
                    tasks.append(members)
                    taken.update(members)
                    break
        if run_id not in taken and checkpoint_path(folder, run_id).exists():
            tasks.append([run_id])
            taken.add(run_id)
    return tasks


class RunState(str, enum.Enum):
    """What `status` says of a run: its result file, its claim and the scheduler's word, combined."""

    PENDING = "PENDING"  # queued (SLURM), or submitted a moment ago
    RUNNING = "RUNNING"  # training now (a SLURM job running, or a claim held)
    REQUEUED = "REQUEUED"  # stopped and put back in the queue (preemption, time limit, scontrol requeue)
    COMPLETED = "COMPLETED"  # its completed result is on disk
    FAILED = "FAILED"  # a failed result, or a job that ended without a completed one
    UNKNOWN = "UNKNOWN"  # a SLURM sweep, but neither sacct nor squeue answers
    MISSING = "MISSING"  # a local run with no result and nobody training it

    def __str__(self) -> str:
        return self.value

    @property
    def done(self) -> bool:
        return self in (RunState.COMPLETED, RunState.FAILED, RunState.MISSING)

    @property
    def live(self) -> bool:
        """Queued or running: something `cancel` can cancel."""
        return self in (RunState.PENDING, RunState.RUNNING, RunState.REQUEUED)

    @classmethod
    def of_job(cls, state: str) -> RunState:
        """A SLURM job state (sacct / squeue) as a run state; a finished job without a completed result
        is FAILED whatever SLURM calls it (CANCELLED, TIMEOUT, NODE_FAIL, even COMPLETED)."""
        from .slurm import TERMINAL

        if state in TERMINAL:
            return cls.FAILED
        if state.startswith("REQUEUE"):
            return cls.REQUEUED if state == "REQUEUED" else cls.PENDING
        if state in ("PENDING", "CONFIGURING", "RESV_DEL_HOLD"):
            return cls.PENDING
        return cls.RUNNING  # RUNNING, COMPLETING, SUSPENDED, STOPPED, SIGNALING, STAGE_OUT, RESIZING


def superseded(folder: Path, manifest: dict[str, Any], finished: dict[str, str | None]) -> dict[str, str]:
    """The runs whose result is history, each as 'running' or 'pending': submitted again since their
    result was written (`--retry-failed`, `--force`; `finished`: run id -> the result's finished_at),
    and being trained (claimed) or waiting to be (queued on SLURM, or a slot in a local sweep that
    still runs). `report` counts these as what they are now, not as their old result. A resubmission
    that ended without a new result leaves the old one standing. Asks the scheduler only when some
    SLURM run was resubmitted after its result."""
    runs = manifest.get("runs", {})
    newer = [
        r
        for r, done in finished.items()
        if isinstance(runs.get(r), dict) and (runs[r].get("submitted_at") or "") > (done or "~")
    ]
    out: dict[str, str] = {}
    on_slurm: dict[str, str] = {}
    for run_id in newer:
        info = runs[run_id]
        if run_is_claimed(folder, run_id):
            out[run_id] = "running"
        elif run_executor(manifest, info) == "slurm":
            if info.get("job_id"):
                on_slurm[run_id] = str(info["job_id"])
        elif _sweep_alive(info):
            out[run_id] = "pending"
    if on_slurm:
        from .slurm import scheduler_states

        states = scheduler_states(list(on_slurm.values())) or {}
        for run_id, job_id in on_slurm.items():
            word = states.get(job_id, "GONE")
            state = RunState.of_job(word) if word not in ("GONE", "UNKNOWN") else None
            if state is not None and state.live:
                out[run_id] = "running" if state is RunState.RUNNING else "pending"
    return out


def run_states(folder: Path) -> list[dict[str, Any]]:
    """One row per run of a sweep: run id, config, job id, state, accuracy, and whether a checkpoint
    resumes it (`resumable`: it ended without a result, and the same sweep again picks it up)."""
    manifest = load_manifest(folder)
    runs = manifest["runs"]
    sched, histories = None, {}
    from .slurm import attempts_note, job_histories, scheduler_states

    on_slurm = {r for r, info in runs.items() if run_executor(manifest, info) == "slurm"}
    if on_slurm:  # (a folder may hold runs of local and SLURM sweeps: only SLURM's are asked about)
        job_ids = [runs[r].get("job_id") for r in on_slurm if runs[r].get("job_id")]
        sched = scheduler_states(job_ids)
        if sched is not None:
            histories = job_histories(job_ids)  # requeues (node failure, preemption) seen by SLURM
    rows = []
    resumable = {r for task in resumable_packs(folder, list(runs)) for r in task}
    for run_id, info in runs.items():
        status, data = result_status(folder, run_id)
        no_result = status is None  # (as `sweep` sees it: plan_runs)
        job_id = info.get("job_id")
        slurm = run_id in on_slurm
        # the job training the run now, from its claim: it wins over whatever the manifest last
        # recorded (a later submission that found the run claimed, and ended)
        holder = claim_holder(folder, run_id)
        state = (sched or {}).get(job_id) if job_id and slurm else None
        # A result older than the run's latest submission (--retry-failed, --force) is history: the
        # new job's state counts, even before sacct lists it.
        stale = (
            slurm
            and sched is not None
            and data is not None
            and (info.get("submitted_at") or "") > (data.get("finished_at") or "~")
        )
        if stale:
            status, data = None, None
        job = RunState.of_job(state) if state and state not in ("GONE", "UNKNOWN") else None
        where = {"executor": run_executor(manifest, info), "host": info.get("host")}
        note = attempts_note(histories.get(job_id, [])) if job_id else ""
        if holder is not None:
            shown = RunState.RUNNING
            if holder.get("job_id") and holder["job_id"] != job_id:
                job_id, note = holder["job_id"], ""
                where = {"executor": holder.get("executor") or where["executor"], "host": holder.get("host")}
        elif status in ("completed", "failed"):
            shown = RunState(status.upper())
            if status == "failed" and job is not None and job.live:
                shown = job  # resubmitted after a failure, going again
        elif job is not None:
            shown = job
        elif status == "running":
            shown = RunState.RUNNING
        elif stale and state != "GONE":
            shown = RunState.PENDING  # submitted a moment ago, not in sacct yet
        elif not slurm and status is None and _sweep_alive(info):
            shown = RunState.PENDING  # waiting for a slot in its local sweep, which still runs here
        elif sched is None and slurm:
            shown = RunState.UNKNOWN
        elif slurm and state != "GONE":
            shown = RunState.PENDING
        elif slurm:
            shown = RunState.FAILED  # gone from the queue without a result (no sacct to say how)
        else:
            shown = RunState.MISSING
        acc = data["metrics"].get("test_accuracy") if data else None
        rows.append(
            {
                "run_id": run_id,
                "config": info.get("config", {}),
                "job_id": job_id,
                "executor": where["executor"],
                "host": where["host"],  # a local run's: where its job id (a process) lives
                "sweep_process": info.get("sweep_process"),  # ... and the sweep that runs it there
                "state": shown,
                "test_accuracy": acc,
                "error": (data or {}).get("error", {}) and data["error"].get("message"),
                "history": note,
                # how far it has got while it trains (its job's note beside the claim)
                "progress": read_progress(folder, run_id) if holder is not None else None,
                # stopped or killed (no result) with a checkpoint: the sweep run again resumes it
                "resumable": shown.done and no_result and run_id in resumable,
            }
        )
    return rows


def _sweep_alive(info: dict[str, Any]) -> bool:
    """Whether the local sweep process that a run's entry names still runs (on this machine)."""
    identity, host = info.get("sweep_process"), info.get("host")
    if not identity or host != socket.gethostname() or identity.startswith(f"{os.getpid()}@"):
        return False  # (elsewhere, or this very process: the sweep itself, asking as it ends)
    from .local import sweep_is_running

    return sweep_is_running(identity)


def log_paths(folder: Path, job_id: str, task: int = 0) -> tuple[Path, Path]:
    """A job's stdout and stderr files: its task `task`'s (a DDP job has one per rank)."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(folder / LOG_DIR, job_id=job_id, task_id=task)
    return paths.stdout, paths.stderr
