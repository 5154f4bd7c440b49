"""Claims: which process trains a run right now, as a lock on `.<run_id>.lock` in the sweep folder, and
a run's status from its result file. The job takes its runs' claims on the compute node (job.py);
`status` and a second `sweep` probe them on the login node (sweepdir.py). No scheduler, no torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import re
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .results import ResultError, load_result, result_path


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
def claim_run(folder: Path, run_id: str, holder: dict[str, Any] | None = None) -> Iterator[bool]:
    """Try to claim a run for this process: an exclusive, non-blocking lock on `.<run_id>.lock` in the
    sweep folder (see above), held for the block. Yields False when another process (or another
    open() of the file) holds it. Where locks do not work (the lock call fails) or are seen only on
    this node (mount options), it warns once on stderr and yields True: the run trains unclaimed.

    `holder` (the job's id and executor, job.py) is written into the claimed file with this host and
    pid: `claim_holder` reads who trains the run, whatever the manifest last recorded for it."""
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
            note = {**(holder or {}), "host": socket.gethostname(), "pid": os.getpid()}
            with contextlib.suppress(OSError):  # (only a note: the lock is the claim)
                f.truncate(0)
                f.write(json.dumps(note) + "\n")
                f.flush()
        try:
            yield held
        finally:
            if held:
                _drop_claim(f)  # (also if a forked child still has the file open)


def run_is_claimed(folder: Path, run_id: str) -> bool:
    """Whether some process is training this run right now (holds its claim). Takes no lock (a worker
    claiming the run at that moment gets it) and creates nothing."""
    return claim_holder(folder, run_id) is not None


def claim_holder(folder: Path, run_id: str) -> dict[str, Any] | None:
    """Who trains this run right now: None if nobody holds its claim, else the holder's note
    (`job_id`, `executor`, `host`, `pid`; {} if it wrote none). Takes no lock and creates nothing."""
    try:
        f = open(claim_path(folder, run_id), "rb")  # noqa: SIM115 - closed below
    except OSError:
        return None
    with f:
        if not _is_locked(f):
            return None
        try:
            note = json.loads(f.read(4096) or b"{}")
        except (OSError, ValueError):  # being written this moment, or foreign
            note = {}
        return note if isinstance(note, dict) else {}


def _is_locked(f) -> bool:
    """Whether another open file holds the claim lock on `f` (see above: a probe takes none)."""
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


# ---- progress ----------------------------------------------------------------------------------
#
# How far a run that trains has got: the job (rank 0) writes `.<run_id>.progress` beside the claim,
# about once a second and at every evaluation, and removes it when the run ends. A local sweep's bar
# and `status` (for SLURM runs too: the folder is shared) read it for the runs whose claim is held.
# Replaced by a rename, never fsynced: a reader sees a whole note or the one before, and a note lost
# to a crash is of no use anyway.

PROGRESS_EVERY_S = 1.0


def progress_path(folder: Path, run_id: str) -> Path:
    return folder / f".{run_id}.progress"


def write_progress(folder: Path, run_ids: list[str], note: dict[str, Any]) -> None:
    """The same note (`iteration`, `iters`; `train_loss`, `test_accuracy` of a lone run) for each run."""
    data = (json.dumps({**note, "at": time.time()}) + "\n").encode()
    for run_id in run_ids:
        path = progress_path(folder, run_id)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):  # (only a note: training goes on without it)
            tmp.write_bytes(data)
            os.replace(tmp, path)


def read_progress(folder: Path, run_id: str) -> dict[str, Any] | None:
    """The run's latest progress note, or None (none written, or unreadable this moment)."""
    try:
        note = json.loads(progress_path(folder, run_id).read_bytes())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) and isinstance(note.get("iteration"), int) else None


def clear_progress(folder: Path, run_ids: list[str]) -> None:
    for run_id in run_ids:
        progress_path(folder, run_id).unlink(missing_ok=True)


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
