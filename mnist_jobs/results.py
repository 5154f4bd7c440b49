"""Result files: the JSON schema, one atomic-write helper, and the loading side. No torch here."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RESULT_KIND = "mnist-jobs/result"
REQUIRED_KEYS = ("schema_version", "kind", "run_id", "status", "config", "metrics")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def open_temp_beside(path: Path) -> tuple[int, Path]:
    """A new temp file `.<name>.<random>.tmp` in path's folder, opened for writing: (fd, its path).

    Created with mode 0666 and the process umask applied by the kernel, as open() creates any normal
    file (tempfile.mkstemp would make it 0600: unreadable to the group sharing a project folder)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temp file beside {path}")


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status), else by setting and
    restoring it (racy only against threads creating files at that very moment)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, rename: readers see the old file or the new
    one, never a partial one, even if this process is killed mid-write. The file gets the mode any
    new file gets (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = open_temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def finite_or_none(obj: Any) -> Any:
    """obj with every NaN / Infinity float (at any depth) replaced by None: what strict JSON can say."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """json.dumps that only ever writes strict JSON (RFC 8259, what jq and JavaScript parse):
    non-finite floats become null instead of the NaN / Infinity tokens."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError as e:  # a NaN or Infinity somewhere: the rare case pays for the walk
        if "out of range float" not in str(e).lower():
            raise  # (a circular reference)
        return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Strict JSON (non-finite floats written as null), atomically: see atomic_write_bytes."""
    atomic_write_bytes(path, (strict_json(obj, indent=2, sort_keys=False) + "\n").encode())


def check_writable_dir(path: Path | str) -> Path:
    """Create the folder if needed and prove we can write there; raise OSError with a clear text."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OSError(f"results dir {path} is not writable ({e.strerror or e})") from None
    return path


def git_info(start: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout this package runs from (None outside a checkout)."""
    here = start or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return {"git_sha": None, "git_dirty": None}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return {"git_sha": sha.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def environment() -> dict[str, Any]:
    """Versions and machine facts a reader needs to trust and reproduce a result (a fresh dict: the
    caller adds to it; the facts are looked up once per process, not once per run of a pack)."""
    return dict(_environment())


@functools.lru_cache(maxsize=1)
def _environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "submitit": _version("submitit"),
        "mnist_jobs": _version("mnist-jobs"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        **git_info(),
    }


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (Linux: /proc, 10 ms resolution), else None: a job's
    start-up (python, imports, data, model) up to its first training step."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22: starttime, clock ticks after boot
        boot = next(
            int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime")
        )
        return max(0.0, time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def slurm_environment() -> dict[str, Any] | None:
    """SLURM job facts from the environment, when running under SLURM."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return None
    keys = {
        "job_id": "SLURM_JOB_ID",
        "array_job_id": "SLURM_ARRAY_JOB_ID",
        "array_task_id": "SLURM_ARRAY_TASK_ID",
        "partition": "SLURM_JOB_PARTITION",
        "nodelist": "SLURM_JOB_NODELIST",
        "num_nodes": "SLURM_JOB_NUM_NODES",
        "ntasks": "SLURM_NTASKS",
        "restart_count": "SLURM_RESTART_COUNT",
    }
    return {k: env.get(v) for k, v in keys.items()}


# ---- loading -----------------------------------------------------------------------------------


class ResultError(ValueError):
    """A file that is not a readable result of a schema this version understands."""


@dataclass(frozen=True)
class LoadedResult:
    path: Path
    data: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def status(self) -> str:
        return self.data["status"]


def parse_result(text: str | bytes, path: Path | str = "<memory>") -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("kind") != RESULT_KIND:
        raise ResultError(f"{path}: not an mnist-jobs result")
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ResultError(f"{path}: schema_version {version!r} is newer than this mnist-jobs reads")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ResultError(f"{path}: missing keys {', '.join(missing)}")
    return data


def load_result(path: Path | str) -> LoadedResult:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ResultError(f"{path}: cannot read ({e.strerror})") from None
    return LoadedResult(path, parse_result(raw, path))


def result_path(folder: Path | str, run_id: str) -> Path:
    """A run's result file: `<folder>/<run_id>.json` (its weights beside it, `.pt`)."""
    return Path(folder) / f"{run_id}.json"
