"""The local backend: a sweep's tasks on this machine through submitit's LocalExecutor, with the
concurrency cap submitit does not have (one job per GPU, an equal share of the CPU threads).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .job import TrainTask


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


def device_error_here(spec: str) -> str | None:
    """Why `--device spec` cannot run on this machine, or None - asked without importing torch where
    the answer is plain (cpu and auto always run; cuda needs a visible GPU), so that planning a local
    sweep stays light; the worker selects its device itself (a CUDA build of torch is its check)."""
    if spec in ("cpu", "auto"):
        return None
    if spec.startswith("cuda"):
        count = local_gpu_count()
        if count == 0:
            return f"--device {spec} requested but CUDA is not available on this machine"
        index = int(spec.split(":", 1)[1]) if ":" in spec else 0
        if index >= count:
            return f"--device {spec} requested but only {count} CUDA device(s) are visible"
        return None
    if spec == "mps" and platform.system() != "Darwin":
        return "--device mps requested but MPS is not available on this machine"
    from .device import DeviceError, select_device  # (MPS on a Mac: torch knows)

    try:
        select_device(spec)
    except DeviceError as e:
        return str(e)
    return None


def local_device_type(spec: str) -> str:
    """The device type `spec` will train on here: what sizes a local pack (cuda, mps or cpu)."""
    if spec == "auto":
        if local_gpu_count():
            return "cuda"
        return "mps" if platform.system() == "Darwin" and platform.machine() == "arm64" else "cpu"
    return spec.split(":", 1)[0]


def user_threads() -> int | None:
    """The thread count the user asked for with OMP_NUM_THREADS, or None. It wins over a local job's
    share of the cores (on SLURM, --cpus-per-task is the job's own request, and wins: job.TrainTask)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def free_port() -> int:
    """A free TCP port on this machine (a local multi-process job's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        if task.threads is None and not gpus and not user_threads():
            task.threads = cpu_threads  # (an OMP_NUM_THREADS of the user's is theirs: torch reads it)
        if tasks_per_node > 1 and task.master_port is None:
            task.master_port = free_port()
        # a Ctrl-C meanwhile is held, and raised as the block ends: once `running` has the job
        with _sigint_held_for_children():
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

    stack = contextlib.ExitStack()
    try:
        stack.enter_context(terminate_as_interrupt())
        while pending or running:
            while pending and slots:
                i, task = pending.pop(0)
                start(i, task, slots.pop(0))
            time.sleep(0.2)
            if on_event:
                on_event("tick", -1, None)  # (the caller's moment to show how far the running ones are)
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
        # Ctrl-C (the tasks had it too) or an error here: every job is told to stop (SIGTERM to its
        # controller, handed to its tasks: each run checkpoints and exits), and given STOP_GRACE_S to
        for job, _ in running.values():
            stop_local_job(str(job.job_id), folder.absolute())
        deadline = time.monotonic() + (STOP_GRACE_S if executor_kind != "debug" else 0)
        while any(not job.done() for job, _ in running.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for job, _ in running.values():
            if not job.done():
                with contextlib.suppress(Exception):
                    job.cancel(check=False)
        raise
    finally:
        stack.close()
    return states


STOP_GRACE_S = 30.0  # how long an interrupted local sweep waits for its jobs to checkpoint and stop


@contextlib.contextmanager
def _sigint_held_for_children():
    """Start a job with SIGINT blocked, which its processes inherit: the terminal's Ctrl-C reaches the
    whole foreground process group, and submitit's controller would answer it by killing the tasks a
    second later, mid-checkpoint. The controller never sees it, then; each task unblocks it once it
    trains (job.TrainTask: it checkpoints and stops), and the sweep tells the controllers to stop with
    SIGTERM, which they hand to their tasks. A Ctrl-C that reaches this process meanwhile is held, not
    lost: it is raised as the block ends."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # ignored (a sweep started with `&` by a script): the jobs inherit that, and keep it
        # (train.stopping_on); a SIGTERM to this process meanwhile (terminate_as_interrupt) is held
        with _held(signal.SIGTERM):
            yield
        return
    # the mask is this thread's (what a child inherits); another thread (rich's refresh) may still take
    # the signal, so the handler holds it too; and a SIGTERM to this process, which it makes a Ctrl-C
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with _held(signal.SIGINT), _held(signal.SIGTERM):
            yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # (one pending here arrives now: held)


@contextlib.contextmanager
def _held(signum: int):
    """While the block runs, this signal is only noted; its handler (if a Python one) runs after."""
    import signal

    held: list[int] = []
    handler = signal.signal(signum, lambda s, frame: held.append(s))
    try:
        yield
    finally:
        signal.signal(signum, handler)
        if held and callable(handler):
            handler(signum, None)  # e.g. Python's default for SIGINT: KeyboardInterrupt, now


@contextlib.contextmanager
def terminate_as_interrupt():
    """While a local sweep runs, SIGTERM to its process (`kill`, `timeout`, a session's end) is a
    Ctrl-C: its jobs are told to stop (each checkpoints) and waited for, rather than left running
    without the sweep, and the runs still waiting for a slot never start."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_local_job(job_id: str, log_folder: Path) -> bool:
    """Ask a local job of this machine to stop, as SLURM's scancel asks a SLURM job: SIGTERM to its
    submitit controller (the job id is its process id), which hands it to the job's tasks; each run
    checkpoints at its next iteration and stops, so the same sweep again resumes it. Only a process
    that is that controller, for that log folder, is signalled (a pid can be reused); returns whether
    one was."""
    import signal

    command = _command_of(job_id)
    if "submitit.local._local" not in command or str(log_folder) not in command:
        return False
    return _signal(int(job_id), signal.SIGTERM)


def process_identity(pid: int | None = None) -> str | None:
    """This process's (or `pid`'s) identity on this machine: its pid and start time, which a reused
    pid does not share; None when there is no such process."""
    pid = os.getpid() if pid is None else pid
    try:  # Linux: the start time in clock ticks since boot (/proc/<pid>/stat, field 22)
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{pid}@{stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        pass
    try:
        out = subprocess.run(["ps", "-p", str(pid), "-o", "lstart="], capture_output=True, text=True)
    except OSError:
        return None
    return f"{pid}@{out.stdout.strip()}" if out.returncode == 0 and out.stdout.strip() else None


def stop_local_sweep(identity: str) -> bool:
    """Interrupt the `mnist-jobs sweep` process of this machine that `identity` (process_identity)
    names, as Ctrl-C in its terminal would: it starts no more runs, tells its jobs to stop (each
    checkpoints) and exits. Returns whether it was signalled (False: it is gone)."""
    import signal

    if not sweep_is_running(identity):
        return False
    return _signal(int(identity.split("@", 1)[0]), signal.SIGINT)


def sweep_is_running(identity: str) -> bool:
    """Whether the process `identity` (process_identity: pid@start time) names runs on this machine
    (a reused pid has another start time)."""
    pid = identity.split("@", 1)[0]
    return pid.isdigit() and process_identity(int(pid)) == identity


def _command_of(pid: str) -> list[str]:
    """A process's command line (argv), or [] when there is no such process."""
    if not pid.isdigit():
        return []
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return [a.decode(errors="replace") for a in argv if a]
    except OSError:  # no /proc (macOS), or no such process
        try:
            out = subprocess.run(["ps", "-p", pid, "-o", "command="], capture_output=True, text=True)
        except OSError:
            return []
        return out.stdout.split()


def _signal(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True
