"""The sweep folder, `<results_dir>/<name>/`: the one owner of its format.

It holds `sweep.json` (the manifest: grid, run ids -> job ids, executor, SLURM parameters, submissions),
one `<run_id>.json` result per run (results.py owns that format), checkpoints, claims
(`.<run_id>.lock`) and submitit's job folder `logs/`. `status`, `cancel`, `logs`, `report` and the
launch code all read it through this module.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import os
import platform
import re
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import ConfigError
from .results import ResultError, atomic_write_json, git_info, load_result, result_path, utc_now

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


def result_status(folder: Path, run_id: str) -> tuple[str | None, dict[str, Any] | None]:
    """('completed' | 'failed' | 'running' | None, data) from the run's result file."""
    path = result_path(folder, run_id)
    if not path.exists():
        return None, None
    try:
        data = load_result(path).data
    except ResultError:
        return None, None
    return data["status"], data


# ---- claims ------------------------------------------------------------------------------------
#
# A claim is an exclusive lock on `.<run_id>.lock`, held while the run trains. On Linux it is an
# open-file-description (OFD) lock: it belongs to the open file, not to the process, so two open()s
# in one process exclude each other too, and closing some other descriptor of the file (a probe's)
# releases nothing. The kernel drops it when the file is closed or the process dies, even by kill -9.
# A probe (`run_is_claimed`: `status`, a second `sweep`) asks F_OFD_GETLK, which reports a conflicting
# lock without taking any, so polling can never make a worker's claim fail. Without F_OFD_* (not
# Linux) the claim is a flock, probed with a shared flock for a moment; the claim then retries for a
# few milliseconds, so a probe's moment does not refuse it either.

# struct flock of 64-bit Linux: short l_type, short l_whence, (pad), off_t l_start, off_t l_len,
# pid_t l_pid, (pad): 32 bytes. (tests/test_checkpoint.py checks it against the kernel.)
FLOCK = struct.Struct("hhqqi4x")
_OFD_MACHINES = {"x86_64", "amd64", "aarch64", "arm64", "ppc64le", "ppc64", "s390x", "riscv64"}
_ofd = (
    sys.platform.startswith("linux")
    and hasattr(fcntl, "F_OFD_SETLK")
    and struct.calcsize("P") == 8
    and platform.machine().lower() in _OFD_MACHINES
)
_FLOCK_RETRIES = 20  # x 5 ms: a probe holds the (fallback) flock for microseconds, a worker for hours
_warned: set[str] = set()  # mounts this process has warned about (one line each)
_checked: set[str] = set()  # folders whose mount this process has looked at


def claim_path(folder: Path, run_id: str) -> Path:
    return folder / f".{run_id}.lock"


def _whole_file(lock_type: int) -> bytes:
    return FLOCK.pack(lock_type, os.SEEK_SET, 0, 0, 0)  # start 0, length 0 = to the end; l_pid 0


def _take_claim(f) -> bool:
    """Lock the open file exclusively, non-blocking: True if taken, False if another open file holds
    it. Other OSErrors (ENOLCK, EOPNOTSUPP, ENOSYS: locking does not work there) propagate."""
    global _ofd
    if _ofd:
        try:
            fcntl.fcntl(f, fcntl.F_OFD_SETLK, _whole_file(fcntl.F_WRLCK))
            return True
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            if e.errno != errno.EINVAL:
                raise
            _ofd = False  # a kernel older than 3.15: flock, as elsewhere
    for attempt in range(_FLOCK_RETRIES):
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < _FLOCK_RETRIES:
                time.sleep(0.005)
    return False


def _drop_claim(f) -> None:
    with contextlib.suppress(OSError):  # (closing the file drops it anyway)
        if _ofd:
            fcntl.fcntl(f, fcntl.F_OFD_SETLK, _whole_file(fcntl.F_UNLCK))
        else:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def claim_run(folder: Path, run_id: str) -> Iterator[bool]:
    """Try to claim a run for this process: an exclusive, non-blocking lock on `.<run_id>.lock` in the
    sweep folder (see above), held for the block. Yields False when another process (or another
    open() of the file) holds it. Where locks do not work (the lock call fails) or are seen only on
    this node (mount options), it warns once on stderr and yields True: the run trains unclaimed."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(claim_path(folder, run_id), "a+") as f:
        try:
            held = _take_claim(f)
        except OSError as e:
            name = errno.errorcode.get(e.errno or 0, "error")
            _warn_claims(folder, f"locking fails: {name} {e.strerror or e}")
            yield True
            return
        if held:
            warn_if_claims_node_local(folder)
        try:
            yield held
        finally:
            if held:
                _drop_claim(f)  # (also if a forked child still has the file open)


def run_is_claimed(folder: Path, run_id: str) -> bool:
    """Whether some process is training this run right now (holds its claim). Takes no lock (a worker
    claiming the run at that moment gets it) and creates nothing."""
    try:
        f = open(claim_path(folder, run_id), "rb")  # noqa: SIM115 - closed below
    except OSError:
        return False
    with f:
        try:
            if _ofd:
                got = fcntl.fcntl(f, fcntl.F_OFD_GETLK, _whole_file(fcntl.F_WRLCK))
                return FLOCK.unpack(got)[0] != fcntl.F_UNLCK
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # (the claim retries past this moment)
        except BlockingIOError:
            return True
        except OSError:
            return False  # no locks here (warned where claims are taken): nobody can be seen
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def node_local_locks(fstype: str, options: str) -> str | None:
    """Why claims (POSIX / OFD locks) on a filesystem of this type mounted with these options (the
    comma-separated mount and superblock options) are seen only on this node, or None where every
    node sees them (or it is a local disk)."""
    opts = dict(o.partition("=")[::2] for o in options.split(",") if o)
    fstype = fstype.lower()
    if fstype in ("nfs", "nfs4"):
        if "nolock" in opts:
            return "mounted nolock: locks are local to this node"
        if opts.get("local_lock") in ("all", "posix"):
            return f"mounted local_lock={opts['local_lock']}: locks are local to this node"
    elif fstype == "lustre":
        if "localflock" in opts:
            return "mounted localflock: locks are local to this node"
        if "flock" not in opts:
            return "mounted without flock: no cluster-wide locks"
    elif fstype in ("cifs", "smb3") and "nobrl" in opts:
        return "mounted nobrl: locks are local to this node"
    return None


def mount_of(path: str, mountinfo: str) -> tuple[str, str, str] | None:
    """(mount point, filesystem type, mount and superblock options) of the mount holding `path` (an
    absolute, resolved path), from the text of /proc/self/mountinfo; the last, deepest mount wins."""
    best: tuple[str, str, str] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or not tail:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, tail[0], ",".join([fields[5], *tail[2:3]]))
    return best


def warn_if_claims_node_local(folder: Path) -> None:
    """Warn once if the folder's mount makes claims node-local (Linux: /proc/self/mountinfo)."""
    key = str(folder)
    if key in _checked:
        return
    _checked.add(key)
    try:
        mount = mount_of(os.path.realpath(folder), Path("/proc/self/mountinfo").read_text())
    except OSError:
        return
    if mount and (why := node_local_locks(mount[1], mount[2])):
        _warn_claims(folder, why, mount)


def _warn_claims(folder: Path, why: str, mount: tuple[str, str, str] | None = None) -> None:
    if mount is None:
        with contextlib.suppress(OSError):
            mount = mount_of(os.path.realpath(folder), Path("/proc/self/mountinfo").read_text())
    fs = f"{mount[1]} {mount[0]}" if mount else str(folder)
    if fs in _warned:
        return
    _warned.add(fs)
    print(
        f"Warning: claims unavailable on {fs} ({why}): two sweeps sharing this folder may train a run twice",
        file=sys.stderr,
        flush=True,
    )


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
        from .slurm import TERMINAL, scheduler_states

        jobs = {r: manifest["runs"].get(r, {}).get("job_id") for r in candidates}
        states = scheduler_states([j for j in jobs.values() if j]) or {}
        for run_id, job_id in jobs.items():
            if job_id and states.get(job_id, "GONE") not in TERMINAL | {"GONE", "UNKNOWN"}:
                skipped["queued"].append(run_id)
        candidates = [r for r in candidates if r not in skipped["queued"]]
    return candidates, skipped


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


def run_states(folder: Path) -> list[dict[str, Any]]:
    """One row per run of a sweep: run id, config, job id, state, accuracy."""
    manifest = load_manifest(folder)
    runs = manifest["runs"]
    sched, histories = None, {}
    from .slurm import attempts_note, job_histories, scheduler_states

    if manifest.get("executor") == "slurm":
        job_ids = [r.get("job_id") for r in runs.values() if r.get("job_id")]
        sched = scheduler_states(job_ids)
        if sched is not None:
            histories = job_histories(job_ids)  # requeues (node failure, preemption) seen by SLURM
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
        job = RunState.of_job(state) if state and state not in ("GONE", "UNKNOWN") else None
        if status in ("completed", "failed"):
            shown = RunState(status.upper())
            if status == "failed" and job is not None and job.live:
                shown = job  # resubmitted after a failure, going again
        elif job is not None:
            shown = job
        elif status == "running" or (status is None and run_is_claimed(folder, run_id)):
            shown = RunState.RUNNING
        elif stale:
            shown = RunState.PENDING  # submitted a moment ago, not in sacct yet
        elif sched is None and manifest.get("executor") == "slurm":
            shown = RunState.UNKNOWN
        elif manifest.get("executor") == "slurm" and state != "GONE":
            shown = RunState.PENDING
        else:
            shown = RunState.MISSING
        acc = data["metrics"].get("test_accuracy") if data else None
        rows.append(
            {
                "run_id": run_id,
                "config": info.get("config", {}),
                "job_id": job_id,
                "state": shown,
                "test_accuracy": acc,
                "error": (data or {}).get("error", {}) and data["error"].get("message"),
                "history": attempts_note(histories.get(job_id, [])) if job_id else "",
            }
        )
    return rows


def log_paths(folder: Path, job_id: str) -> tuple[Path, Path]:
    from submitit.core.utils import JobPaths

    paths = JobPaths(folder / LOG_DIR, job_id=job_id, task_id=0)
    return paths.stdout, paths.stderr
