"""The job: what runs on a compute node (or a local worker) for one array task - a lone run or a pack.

`TrainTask` is the picklable callable submitit runs: it claims its runs in the sweep folder, routes the
stop signals (USR2, SIGTERM) to the training loop, and is the one `Checkpointable` submitit requeues,
for lone runs and packs alike. Nothing here runs on the login node; training code is imported lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable

from .claims import claim_run, result_status
from .config import TrainConfig
from .results import atomic_write_json, result_path

DEFAULT_MAX_REQUEUES = 3


@dataclass
class TrainTask(Checkpointable):
    """The picklable callable submitit runs: one run, or a pack of runs trained together.

    With several tasks (--tasks-per-node / --nodes), every task runs this; the process group comes
    from submitit's job environment and rank 0 alone writes the result.

    A submitit `Checkpointable`: on the time-limit / preemption signal (USR2) the run checkpoints at the
    next iteration boundary, then submitit calls `checkpoint()` and requeues the job, which resumes from
    that checkpoint (at most `max_requeues` times). On SIGTERM (scancel, `scontrol requeue`, preemption
    without a user signal) it checkpoints and exits; whatever SLURM starts again resumes likewise. On
    SIGINT (Ctrl-C in a local sweep's terminal) and SIGHUP (its terminal closed; not under nohup) the
    same: the sweep again resumes it.
    Each run is claimed (a lock held while it trains, see claims.claim_run), so two sweeps sharing a
    folder never train the same run at once, and a run completed elsewhere meanwhile is not trained
    again. In a DDP job rank 0 claims, and the other ranks train exactly what it admitted.

    A pack whose checkpoint is on disk resumes whole even when some of its runs are not this task's
    to write: those with a result, or claimed by another process, when the job starts (`carried`
    names the runs the planner found so; one of them with neither by now is trained and written as
    the others). They are trained along from the checkpoint and never written or logged, so the
    others continue instead of restarting in a smaller pack.
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
    fresh: bool = False  # --force: the first attempt drops the runs' checkpoints (requeued ones resume)
    carried: list[str] = field(default_factory=list)  # runs the planner found done or taken elsewhere

    def __call__(self) -> list[dict[str, Any]]:
        import torch

        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0"))
        if threads:
            torch.set_num_threads(threads)
        dist = self.dist_info()
        with contextlib.ExitStack() as claims:
            if dist.is_main:  # (rank 0 of a DDP job claims for all its ranks, and holds the claims)
                todo, skipped = self._claim(claims)
                if dist.distributed:
                    self._admit(claims, dist, todo, skipped)
            else:
                todo, skipped = self._admitted(dist)
            todo, carried = self._carrying(todo)
            configs = [TrainConfig.from_dict(self.configs[i]) for i in todo]
            run_ids = [self.run_ids[i] for i in todo]
            records = self._train(configs, run_ids, dist, carried) if configs else []
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
        holder = _holder()
        for i, run_id in enumerate(self.run_ids):
            carried = run_id in self.carried  # (the planner's: not the sweep's to do when it planned)
            if carried and result_status(folder, run_id)[0] is not None:
                continue  # its result (completed, or failed and not retried) stays as it is
            if not claims.enter_context(claim_run(folder, run_id, holder)):
                if not carried:
                    skipped.append({"run_id": run_id, "status": RUNNING_ELSEWHERE, "test_accuracy": None})
                continue
            status, data = result_status(folder, run_id)
            if status == "completed" and self.skip_completed:
                acc = data["metrics"].get("test_accuracy") if data else None
                skipped.append({"run_id": run_id, "status": COMPLETED_ELSEWHERE, "test_accuracy": acc})
                continue
            todo.append(i)
        return todo, skipped

    def _carrying(self, todo: list[int]) -> tuple[list[int], list[str]]:
        """The runs to train (indices), and the run ids among them to carry: when only some of a
        pack's runs are to be written and the whole pack's checkpoint is there, the pack trains whole
        (the checkpoint holds its models stacked, in its order: a smaller pack would restart)."""
        from .checkpoint import population_path

        n = len(self.run_ids)
        if not todo or len(todo) == n or (self.fresh and self.requeue_count() == 0):
            return todo, []  # (--force's first attempt starts afresh: it drops the checkpoint)
        if not population_path(self.results_dir, self.run_ids).exists():
            return todo, []  # nothing to resume: the rest train as a smaller pack
        return list(range(n)), [r for i, r in enumerate(self.run_ids) if i not in todo]

    def _admission_path(self) -> Path:
        """Where rank 0 of a DDP job leaves the runs it claimed for its ranks: named after the job and
        the attempt, so a requeued or restarted job never reads an earlier attempt's decision. (Not
        `*.json`: one left by a killed job is never taken for a result.)"""
        import submitit

        job_id = submitit.JobEnvironment().job_id
        return Path(self.results_dir) / f".{self.run_ids[0]}.admit-{job_id}.{self.requeue_count()}"

    def _admit(self, claims: contextlib.ExitStack, dist, todo: list[int], skipped: list[dict]) -> None:
        """Rank 0: write the decision (atomically) for the other ranks; once they have all read it
        (each leaves a `.rank<r>` mark beside it) and the job is done, remove it (`claims` closes)."""
        path = self._admission_path()
        _remove_stale_admissions(path.parent)
        train = [self.run_ids[i] for i in todo]
        atomic_write_json(
            path, {"run_ids": self.run_ids, "job": path.name, "train": train, "skipped": skipped}
        )
        marks = [path.with_name(f"{path.name}.rank{r}") for r in range(1, dist.world_size)]

        def remove() -> None:
            _wait_for(lambda: all(m.exists() for m in marks), _dist_timeout_s())
            for p in (path, *marks):
                p.unlink(missing_ok=True)

        claims.callback(remove)  # (runs before the claims are released: they were entered earlier)

    def _admitted(self, dist) -> tuple[list[int], list[dict[str, Any]]]:
        """A DDP rank other than 0: train exactly the runs rank 0 claimed (waits for its decision)."""
        path = self._admission_path()
        timeout = _dist_timeout_s()

        def read() -> dict[str, Any] | None:
            try:
                data = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return None
            return data if data.get("run_ids") == self.run_ids else None

        data = _wait_for(read, timeout)
        if data is None:
            raise RuntimeError(
                f"rank {dist.rank}: no decision from rank 0 on which runs to train after {timeout:g} s "
                f"(no {path} for this job's runs; MNIST_JOBS_DIST_TIMEOUT_S sets the wait)"
            )
        path.with_name(f"{path.name}.rank{dist.rank}").touch()
        admitted = set(data["train"])
        return [i for i, r in enumerate(self.run_ids) if r in admitted], list(data["skipped"])

    def _train(
        self, configs: list[TrainConfig], run_ids: list[str], dist, carried: list[str]
    ) -> list[dict[str, Any]]:
        """One run or a pack (the same loop), with the stop signals routed to it (it checkpoints, then
        stops); the records of the runs it writes (not of those it carries)."""
        from .train import STOP_SIGNALS, Interrupted, StopFlag, stopping_on, train_pack

        if self.fresh and self.requeue_count() == 0 and dist.is_main:
            # --force: start from scratch, decided here, on the node, once the job really runs (the
            # login node deletes nothing, so a refused command leaves every checkpoint in place)
            from .checkpoint import checkpoint_path, population_path

            population_path(self.results_dir, run_ids).unlink(missing_ok=True)
            for run_id in run_ids:
                checkpoint_path(self.results_dir, run_id).unlink(missing_ok=True)
        stop = StopFlag()
        # SIGINT: Ctrl-C in the terminal of a local sweep reaches its tasks too (local.run_local)
        with (
            stopping_on(stop, (signal.SIGUSR2, *STOP_SIGNALS)) as previous,
            _progress_notes(
                Path(self.results_dir), [r for r in run_ids if r not in carried] if dist.is_main else []
            ) as progress,
        ):
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
                    carried=carried,
                    progress=progress,
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
        return DelayedSubmission(dataclasses.replace(self, requeues=done + 1, fresh=False))

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


@contextlib.contextmanager
def _progress_notes(folder: Path, run_ids: list[str]):
    """The training loop's progress callback in a job: each evaluation's line to the job's log (its
    stdout, as without a callback), and the runs' iteration beside their claims about once a second
    (claims.write_progress: what a local sweep's bar and `status` show), removed when the runs end.
    None where there is nothing to note (a DDP rank other than 0)."""
    if not run_ids:
        yield None
        return
    from .claims import PROGRESS_EVERY_S, clear_progress, write_progress

    due, accuracy = 0.0, None
    # a note per run: a big pack notes less often (on a network filesystem each is a rename)
    every_s = PROGRESS_EVERY_S * max(1.0, len(run_ids) / 4)

    def note(p) -> None:
        nonlocal due, accuracy
        if p.line:
            print(p.line, flush=True)
        if p.test_accuracy is not None:
            accuracy = p.test_accuracy  # (the latest evaluation's, between evaluations too)
        now = time.monotonic()
        if p.line or now >= due:  # (every evaluation, and between them about once a second)
            info = {"iteration": p.iteration, "iters": p.total}
            if len(run_ids) == 1:  # (a pack's figures are means over its models: not one run's)
                info.update(train_loss=p.train_loss, test_accuracy=accuracy)
            write_progress(folder, run_ids, info)
            due = now + every_s

    try:
        yield note
    finally:
        clear_progress(folder, run_ids)


RUNNING_ELSEWHERE = "running elsewhere"  # what a task reports for a run it left to another process


COMPLETED_ELSEWHERE = "completed elsewhere"  # ... and for one completed by another process meanwhile


STALE_ADMISSION_S = 3600.0  # an admission file older than this (and than twice the DDP wait) is stale


def _holder() -> dict[str, Any]:
    """This job as its claims name it (claims.claim_holder): `status` and `cancel` find the job that
    trains a run through it, whatever the manifest last recorded (a later submission's job id)."""
    import submitit

    try:
        env = submitit.JobEnvironment()
        return {"job_id": str(env.job_id), "executor": "slurm" if env.cluster == "slurm" else "local"}
    except Exception:  # not under submitit (a task called in-process)
        return {}


def _remove_stale_admissions(folder: Path) -> None:
    """Remove the decisions (and their ranks' marks) that DDP jobs killed before rank 0 could remove
    them left behind (kill -9, a node's death): those older than an hour and than twice the DDP wait,
    which no live job's rank still waits for."""
    limit = time.time() - max(STALE_ADMISSION_S, 2 * _dist_timeout_s())
    for p in folder.glob(".*.admit-*"):
        with contextlib.suppress(OSError):
            if p.stat().st_mtime < limit:
                p.unlink()


def _dist_timeout_s() -> float:
    from .device import dist_timeout_s

    return dist_timeout_s()


def _wait_for(probe: Callable[[], Any], timeout_s: float, every_s: float = 0.05) -> Any:
    """probe()'s first truthy answer, polled until timeout_s has passed (then its last answer)."""
    deadline = time.monotonic() + timeout_s
    while not (answer := probe()) and time.monotonic() < deadline:
        time.sleep(every_s)
    return answer


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
        atomic_write_json(result_path(task.results_dir, record["run_id"]), record)
