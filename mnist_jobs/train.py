"""One training loop, top to bottom: the callable every job (local, SLURM, sweep task, pack) executes.

    result = train(TrainConfig(lr=0.01), results_dir="results")
    records = train_pack([cfg_a, cfg_b], results_dir="results", run_ids=["a", "b"])

writes `results/<run_id>.json` per run (atomically) and returns the same dicts. A lone run is a pack of
one: the same loop trains a population of N >= 1 models (`population.make_population`) on 1..M ranks (DDP,
N = 1), and everything around the step is written once - data, batch order, evaluation cadence,
history, checkpoints and resume, stopping on a signal, the records and the weights. A run that raises
still leaves a record with status "failed" and the error (every run of a pack does). No typer, rich or
submitit in here: progress goes to an optional callback (the CLI draws a rich bar with it) or, without
one, to plain log lines.

Checkpoints (see checkpoint.py): a run finding its checkpoint (`<run_id>.ckpt.pt`, a pack's
`pack-<hash>.ckpt.pt`) resumes from it; with `checkpoint_every=N` it writes one every N iterations;
when `stop` (an Event the job's signal handlers set) is set, it writes one at the next iteration
boundary and raises `Interrupted`, writing no result.

TensorBoard (see tblog.py): rank 0 writes each run's evaluations and hyperparameters to
`<results_dir>/tb/<run_id>/`, every step once across resumes, when the tensorboard package is there.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from . import checkpoint as ckpt
from . import data as mnist_data
from . import graphs, tblog
from .config import TrainConfig
from .device import (
    SINGLE,
    DistInfo,
    PeerLost,
    all_reduce_sum,
    device_name,
    is_peer_lost,
    process_group,
    rank_device,
    synchronize,
)
from .packing import EVAL_CHUNK, PackError, check_pack_fits, check_same_pack_keys
from .population import make_population
from .results import (
    RESULT_KIND,
    SCHEMA_VERSION,
    atomic_write_bytes,
    atomic_write_json,
    environment,
    result_path,
    seconds_since_process_start,
    slurm_environment,
    utc_now,
)
from .schedule import lr_scale_fn

STOP_POLL_DDP = 20  # under DDP the ranks agree on a stop request every N iterations (one tiny all-reduce)


class Interrupted(Exception):
    """The run was told to stop (preemption, time limit, scancel); it checkpointed first.

    `records` are the unwritten results (status "interrupted"; `record` is the first), `signum` the
    signal that asked for the stop.
    """

    def __init__(
        self, iteration: int, signum: int | None, records: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(f"stopped by signal {signum} after a checkpoint at iteration {iteration}")
        self.iteration = iteration
        self.signum = signum
        self.records = records or []

    @property
    def record(self) -> dict[str, Any] | None:
        return self.records[0] if self.records else None


class Diverged(RuntimeError):
    """Every run of the call diverged (a train or test loss became NaN or infinite); their failed
    records are written. `records` are those records. (In a pack where only some runs diverge,
    nothing is raised: the diverged runs' records are failed, the others completed.)"""

    def __init__(self, message: str, records: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.records = records or []


class StopFlag:
    """Set from a signal handler: the loop checkpoints at the next iteration boundary and stops.

    Plain attributes, no lock: a second signal (Ctrl-C's SIGINT, then the SIGTERM the local
    controller forwards) runs its Python handler inside the first one's, and a lock taken there
    (threading.Event.set's) deadlocked the run for good."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._requested = False

    def request(self, signum: int | None = None) -> None:
        self.signum = signum
        self._requested = True

    def is_set(self) -> bool:
        return self._requested


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # scancel / requeue, Ctrl-C, hang-up


@contextlib.contextmanager
def stopping_on(stop: StopFlag, signums: Sequence[int]) -> Iterator[dict[int, Any]]:
    """While the block runs, these signals only ask the training loop to stop (`stop.request`: it
    checkpoints at the next iteration, then raises Interrupted); the previous handlers (submitit's)
    are restored after, and handed to the block. A signal ignored now (SIGHUP under nohup, SIGINT in
    a job of a sweep a script started with `&`) stays ignored. Those blocked (a local job's SIGINT,
    see local.py) are unblocked: held ones arrive now."""
    if threading.current_thread() is not threading.main_thread():
        yield {}
        return
    # (SIGTERM is always the stop request: scancel's, the local sweep's)
    signums = [s for s in signums if s == signal.SIGTERM or signal.getsignal(s) != signal.SIG_IGN]
    previous = {s: signal.signal(s, lambda signum, frame: stop.request(signum)) for s in signums}
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(signums))
    try:
        yield previous
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass(frozen=True)
class Progress:
    iteration: int
    total: int
    train_loss: float  # a pack's: the mean over its models
    test_accuracy: float | None = None  # set on evaluation steps
    line: str = ""  # on evaluation steps: the log line a run without a callback prints


ProgressFn = Callable[[Progress], None]


def default_run_id(config: TrainConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return f"{config.model}-{config.config_id()}-{stamp}"


def resumable_run_id(config: TrainConfig, results_dir: Path | str) -> str | None:
    """The id of the newest stopped run of `config` in `results_dir` that its checkpoint resumes (a
    `train` in the foreground stopped by Ctrl-C: `<model>-<config id>-<stamp>.ckpt.pt`, no result
    yet), or None."""
    prefix = f"{config.model}-{config.config_id()}-"
    for path in sorted(Path(results_dir).glob(f"{prefix}*{ckpt.SUFFIX}"), reverse=True):  # newest stamp first
        run_id = path.name[: -len(ckpt.SUFFIX)]
        if not result_path(results_dir, run_id).exists():
            return run_id
    return None


@torch.no_grad()
def evaluate(
    pop, x: torch.Tensor, y: torch.Tensor, dist: DistInfo = SINGLE
) -> tuple[list[float], list[float]]:
    """Per model of the population, (accuracy in percent, mean cross-entropy) over a whole split;
    sharded over ranks under DDP."""
    if dist.distributed:
        x, y = x.tensor_split(dist.world_size)[dist.rank], y.tensor_split(dist.world_size)[dist.rank]
    correct = torch.zeros(pop.n, dtype=torch.float64, device=x.device)
    loss_sum = torch.zeros(pop.n, dtype=torch.float64, device=x.device)
    for xs, ys in zip(x.split(EVAL_CHUNK), y.split(EVAL_CHUNK)):
        logits = pop.eval_logits(xs)  # (N, len(xs), 10)
        for m in range(pop.n):
            loss_sum[m] += F.cross_entropy(logits[m], ys, reduction="sum").double()
        correct += (logits.argmax(2) == ys).sum(1)
    count = torch.tensor(float(len(y)), dtype=torch.float64, device=x.device)
    all_reduce_sum(correct, loss_sum, count)
    total = count.item()
    return [100.0 * c / total for c in correct.tolist()], [s / total for s in loss_sum.tolist()]


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """A model's final weights beside its result (a state_dict, atomically written)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().contiguous() for k, v in state.items()}, buf)  # not views into one
    atomic_write_bytes(path, buf.getvalue())


def new_record(config: TrainConfig, run_id: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The skeleton of a result file; the loop fills in metrics and timings."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": RESULT_KIND,
        "run_id": run_id,
        "status": "running",
        "error": None,
        "config": config.to_dict(),
        "metrics": {},
        "timings": {},
        "env": environment(),
        "slurm": slurm_environment(),
        "distributed": {"world_size": 1, "backend": None, "nodes": 1, "tasks_per_node": 1, "hosts": []},
        "packed_with": [],
        "started_at": utc_now(),
        "finished_at": None,
        **(extra or {}),
    }


def error_info(e: BaseException) -> dict[str, Any]:
    return {
        "type": type(e).__name__,
        "message": str(e) or type(e).__name__,
        "traceback": traceback.format_exc(limit=20),
    }


def train(config: TrainConfig, *, run_id: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Train one model as `config` says, write its JSON result (rank 0 only), return it: a pack of one
    (`train_pack`'s keyword arguments)."""
    return train_pack([config], run_ids=[run_id or default_run_id(config)], **kwargs)[0]


def train_pack(
    configs: Sequence[TrainConfig],
    *,
    results_dir: Path | str = "results",
    run_ids: Sequence[str],
    data_dir: Path | str | None = None,
    progress: ProgressFn | None = None,
    extra: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    dist: DistInfo = SINGLE,
    checkpoint_every: int | None = 0,
    stop: StopFlag | None = None,
    requeues: int = 0,
    max_requeues: int | None = None,
    exact: bool | None = None,
    tensorboard: bool | None = None,
    cuda_graphs: bool | str | None = None,
    carried: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Train `configs` together (one, or several sharing packed.PACK_KEYS) and write one result per
    run; return the records (with `result_path`).

    `carried`: run ids of the pack trained along but not this call's to write (no result, weights or
    TensorBoard logs, not returned): a checkpointed pack some of whose runs completed, or are training,
    elsewhere resumes whole (job.TrainTask), since its checkpoint only loads into the same pack.

    Resumes from the runs' checkpoint when there is a usable one. `checkpoint_every`: N iterations
    between checkpoints (0: none; None: the default rule of `checkpoint.resolve_every`). `requeues` and
    `max_requeues` are only recorded (the job that requeues knows them). `extra` is merged into every
    record, or given per run as a list. A pack's records add `packed_with` (the other run ids).
    `exact` (packs only): True computes every model with its lone run's own kernel calls, bit-identical
    on CPU; False batches GEMMs / convolutions over the pack; default: see `packed`.
    `tensorboard`: write TensorBoard logs (tblog.py); None: unless $MNIST_JOBS_TENSORBOARD=0.
    `cuda_graphs` (graphs.py): None - capture the step on CUDA where it can be, unless
    $MNIST_JOBS_CUDA_GRAPHS=0; False - never; "twin" - the CPU twin of the capture (tests).

    Divergence: a run whose train or test loss is not finite at an evaluation has diverged. Its
    record is "failed" with error type "Diverged" and `metrics.diverged_at_iteration`; the others of a
    pack train on. Training stops at the first evaluation where every run has diverged, and when every
    run diverged, `Diverged` is raised after the records are written (as any failure raises).
    """
    configs, run_ids = list(configs), list(run_ids)
    if not configs or len(configs) != len(run_ids):
        raise PackError(f"need one run id per config (got {len(configs)} configs, {len(run_ids)} ids)")
    if len(set(run_ids)) != len(run_ids):
        raise PackError("run ids in a pack must be distinct")
    carried = set(carried)
    if not carried < set(run_ids):
        raise PackError(f"carried runs must be some of the pack's runs, not all (got {sorted(carried)})")
    extras = list(extra) if isinstance(extra, (list, tuple)) else [extra or {}] * len(configs)
    if len(extras) != len(configs):
        raise PackError(f"need one extra dict per config (got {len(extras)} for {len(configs)} configs)")
    ckpt_file = ckpt.population_path(results_dir, run_ids)
    records = []
    for cfg, rid, ex in zip(configs, run_ids, extras):
        rec = new_record(cfg, rid, {"packed_with": [r for r in run_ids if r != rid], **ex})
        rec["checkpointing"] = {
            "every": ckpt.resolve_every(checkpoint_every, cfg.iters),
            "path": str(ckpt_file),
            "resumed_from_iteration": None,
            "resumes": 0,
            "requeues": requeues,
            "max_requeues": max_requeues,
        }
        records.append(rec)
    paths = [result_path(results_dir, rid) for rid in run_ids]
    histories: list[list[dict[str, Any]]] = [[] for _ in configs]
    tb = tblog.RunLogs(
        results_dir, run_ids, configs, enabled=dist.is_main and tblog.wanted(tensorboard), skip=carried
    )
    t_start = time.perf_counter()
    try:
        attempt = _Attempt(
            configs=configs, records=records, histories=histories, paths=paths, ckpt_file=ckpt_file, tb=tb,
            carried=frozenset(carried),
        )  # fmt: skip
        _run(
            attempt,
            data_dir=data_dir,
            progress=progress,
            t_start=t_start,
            dist=dist,
            stop=stop,
            exact=exact,
            cuda_graphs=cuda_graphs,
        )
        for rec in records:
            rec["status"] = "failed" if rec["error"] else "completed"  # error: set for diverged runs
    except Interrupted as e:
        for rec, history in zip(records, histories):
            rec["status"] = "interrupted"  # not written: the checkpoint carries the run
            rec["metrics"].setdefault("history", history)
        e.records = [r for r in records if r["run_id"] not in carried]
        raise
    except BaseException as e:
        if dist.distributed and is_peer_lost(e) and not _a_peer_failed(paths[0], dist):
            # a node died / a rank was killed: not the run's failure. No record (the last checkpoint
            # carries the run); the job fails, and SLURM's requeue or the next `sweep` resumes it
            for rec, history in zip(records, histories):
                rec["status"] = "interrupted"
                rec["metrics"].setdefault("history", history)
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise PeerLost(
                f"rank {dist.rank} on {socket.gethostname()}: lost its peers ({first_line}); no result "
                f"written, the checkpoint {ckpt_file.name} is kept: the run resumes from it when the "
                "job is requeued or the sweep is run again"
            ) from e
        err = error_info(e)
        for rec, history in zip(records, histories):
            rec["status"] = "failed"
            rec["error"] = err
            rec["metrics"].setdefault("history", history)
        if dist.distributed:
            _share_rank_error(paths[0], dist, records[0])
        raise
    finally:
        finished = utc_now()
        tb.close()
        for m, rec in enumerate(records):
            rec["tensorboard"] = tb.dir_of(m)  # None: not logged (off, not installed, not rank 0)
        for rec, path in zip(records, paths):
            rec["finished_at"] = finished
            earlier = rec["timings"].get("earlier_attempts_s", 0.0)  # when resumed: the time before
            rec["timings"]["total_s"] = round(time.perf_counter() - t_start + earlier, 4)
            rec["timings"]["pack_size"] = len(configs)
            if dist.is_main and rec["status"] != "interrupted" and rec["run_id"] not in carried:
                atomic_write_json(path, rec)
            rec["result_path"] = str(path)
    records = [r for r in records if r["run_id"] not in carried]
    mine = [r["run_id"] for r in records]
    if dist.is_main:  # the results are complete and on disk: the checkpoint has done its job
        ckpt_file.unlink(missing_ok=True)
        ckpt.remove_finished(results_dir, mine=mine)  # and any older one these runs left elsewhere
    if all(rec["status"] == "failed" and rec["error"]["type"] == "Diverged" for rec in records):
        raise Diverged(records[0]["error"]["message"], records)  # every run diverged: the job fails
    return records


def _a_peer_failed(path: Path, dist: DistInfo) -> bool:
    """Rank 0, on a lost connection: did a peer fail first (and leave its error, see _share_rank_error)?
    Then the run failed (the peer's error is the record's). Other ranks: never a failure of theirs."""
    if not dist.is_main:
        return False
    time.sleep(1.0)  # let a crashing peer finish writing
    errors = path.with_name(f".{path.stem}.rank-errors")
    return errors.is_dir() and any(errors.glob("rank*.json"))


def _share_rank_error(path: Path, dist: DistInfo, record: dict[str, Any]) -> None:
    """A failing rank leaves its error beside the result; rank 0 (which typically fails later, on a
    collective timeout) reports the first real error of any rank in the job's record."""
    errors = path.with_name(f".{path.stem}.rank-errors")
    if not dist.is_main:
        atomic_write_json(errors / f"rank{dist.rank}.json", {"rank": dist.rank, **record["error"]})
        return
    time.sleep(1.0)  # let a crashing peer finish writing
    peers = sorted(errors.glob("rank*.json")) if errors.is_dir() else []
    if peers:
        first = json.loads(peers[0].read_text())
        record["error"] = {
            **first,
            "message": f"rank {first['rank']}: {first['message']}",
            "rank0_error": record["error"]["message"],
        }
    shutil.rmtree(errors, ignore_errors=True)


@dataclass
class LoopState:
    """Everything the loop changes as it goes, in one object: a checkpoint saves it (with the
    population's state and each rank's RNG) and a resume restores it, so a resumed run continues
    bit for bit where it stopped."""

    shuffle: list[torch.Generator]  # per model: its batch order (seeded by its config's seed)
    loss_sum: torch.Tensor  # (N,) on the device: training losses since the last evaluation
    histories: list[list[dict[str, Any]]]  # per model: one entry per evaluation
    iteration: int = 0
    loss_count: int = 0
    batches: list[torch.Tensor] = field(default_factory=list)  # the epoch's pending (N, B) batches, reversed
    train_s: float = 0.0
    eval_s: float = 0.0
    checkpoint_s: float = 0.0
    earlier_s: float = 0.0  # total time of the attempts before this one

    def next_batch(self, n_train: int, batch_size: int, device: torch.device) -> torch.Tensor:
        """Model m's next batch is row m: each model shuffles each epoch with its own generator (as
        DataLoader(shuffle=True) would, last batch partial)."""
        if not self.batches:
            perms = torch.stack([torch.randperm(n_train, generator=g) for g in self.shuffle]).to(device)
            self.batches = list(perms.split(batch_size, dim=1))
            self.batches.reverse()  # pop() from the end = batches in permutation order
        return self.batches.pop()

    def state_dict(self, total_s: float) -> dict[str, Any]:
        pending = torch.cat(self.batches, dim=1).cpu() if self.batches else torch.zeros(0, dtype=torch.int64)
        return {
            "iteration": self.iteration,
            "loss_count": self.loss_count,
            "batches": (pending, [b.shape[1] for b in self.batches]),  # one tensor saves much faster
            "shuffle_rng": [g.get_state() for g in self.shuffle],
            "histories": self.histories,
            "timings": {
                "train_s": self.train_s,
                "eval_s": self.eval_s,
                "checkpoint_s": self.checkpoint_s,
                "total_s": total_s,
            },
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.iteration, self.loss_count = state["iteration"], state["loss_count"]
        for mine, saved in zip(self.histories, state["histories"]):
            mine[:] = saved
        pending, sizes = state["batches"]
        self.batches = list(pending.to(device).split(sizes, dim=1)) if sizes else []
        for g, s in zip(self.shuffle, state["shuffle_rng"]):
            g.set_state(s)
        t = state["timings"]
        self.train_s, self.eval_s, self.checkpoint_s = t["train_s"], t["eval_s"], t["checkpoint_s"]
        self.earlier_s = t["total_s"]


@dataclass(frozen=True, kw_only=True)
class _Attempt:
    """What one attempt at a run (or pack) fills in: its records and histories (one per config), and
    where its results, checkpoint and TensorBoard logs go."""

    configs: list[TrainConfig]
    records: list[dict[str, Any]]
    histories: list[list[dict[str, Any]]]
    paths: list[Path]
    ckpt_file: Path
    tb: tblog.RunLogs
    carried: frozenset[str] = frozenset()  # run ids trained along, not written (train_pack)


def _run(
    attempt: _Attempt,
    *,
    data_dir: Path | str | None,
    progress: ProgressFn | None,
    t_start: float,
    dist: DistInfo,
    stop: StopFlag | None,
    exact: bool | None,
    cuda_graphs: bool | str | None,
) -> None:
    configs, records, histories = attempt.configs, attempt.records, attempt.histories
    paths, ckpt_file, tb = attempt.paths, attempt.ckpt_file, attempt.tb
    # -- what: one config, or a pack of configs sharing everything but lr, momentum, weight decay, seed
    #    (so its schedule too: one lr factor per step, on each model's own lr)
    n = len(configs)
    if n > 1:
        check_same_pack_keys(configs)
    cfg = configs[0]  # its model, optimizer, schedule, inputs, batch size, iterations, eval cadence and
    #                   device are all's
    run_ids = [r["run_id"] for r in records]

    # -- where (a pack is sized here, on the machine that trains it, before anything is loaded)
    device = rank_device(cfg.device, dist)
    if dist.distributed and cfg.batch_size < dist.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the world size {dist.world_size}")
    for rec in records:
        rec["env"].update(
            device=str(device),
            device_name=device_name(device),
            cuda=torch.version.cuda if device.type == "cuda" else None,
            torch_threads=torch.get_num_threads(),
        )
    if n > 1:
        check_pack_fits(cfg, n, device)
    every = records[0]["checkpointing"]["every"]

    t_group = time.perf_counter()
    with process_group(dist, device) as backend:
        hosts = _gather(socket.gethostname(), dist)  # where each rank runs, in rank order
        # DDP: the wait for every rank to start and connect (0 alone); not part of loading the data
        rendezvous_s = time.perf_counter() - t_group
        for rec in records:
            rec["distributed"] = {
                "world_size": dist.world_size,
                "backend": backend,
                "nodes": dist.nodes,
                "tasks_per_node": dist.local_world_size,
                "hosts": hosts,
            }
        # -- data, decoded once and kept on the device
        ds = mnist_data.load(data_dir, device=device, normalize=cfg.normalize, deskew=cfg.deskew)

        # -- the models and the step that trains them (each model seeded and built as its lone run;
        #    DDP: the one model, wrapped), and the loop's state: fresh, or as a checkpoint left it
        lr_scale = lr_scale_fn(cfg)  # None: the lr is constant (set once, by the optimizers)
        not_graphed = graphs.why_not(configs, dist, device, cuda_graphs)  # None: captured
        # under a schedule a captured SGD update would freeze its lr: plain SGD steps after the graph
        pop = make_population(
            configs, ds, dist, device, exact, fuse_sgd=not_graphed is not None or lr_scale is None
        )
        if not_graphed is None:
            pop = graphs.wrap(pop, (n, cfg.batch_size), device, cuda_graphs)
        for rec in records:
            rec["env"].update(cuda_graphs=not_graphed is None, cuda_graphs_note=not_graphed)
        synchronize(device)
        data_load_s = time.perf_counter() - t_start - rendezvous_s
        loop = LoopState(
            shuffle=[torch.Generator().manual_seed(c.seed) for c in configs],
            loss_sum=torch.zeros(n, device=device),
            histories=histories,
        )
        saved = ckpt.load(ckpt_file, configs, run_ids)  # every rank reads the same file
        if saved is not None:
            pop.load_state_dict(saved["population"])
            loop.load_state_dict(saved["loop"], device)
            per_rank = saved["per_rank"]
            mine = per_rank[dist.rank] if len(per_rank) == dist.world_size else per_rank[0]
            ckpt.set_rng_state(mine["rng"], device)
            loop.loss_sum = mine["loss_sum"].to(device)
            for rec, error in zip(records, saved.get("errors") or [None] * n):
                rec["error"] = error  # a model diverged before the checkpoint: its error, word for word
                rec["timings"]["earlier_attempts_s"] = loop.earlier_s
                rec["started_at"] = saved["started_at"]
                rec["checkpointing"].update(
                    resumed_from_iteration=loop.iteration, resumes=saved["resumes"] + 1
                )
            if dist.is_main:
                print(
                    f"resuming {', '.join(run_ids)} from {ckpt_file} at iteration {loop.iteration}",
                    flush=True,
                )
        tb.start(histories, loop.iteration if saved is not None else None)  # rank 0 (tb is off elsewhere)

        def save_checkpoint() -> None:
            mine = {"rng": ckpt.rng_state(device), "loss_sum": loop.loss_sum.detach().cpu()}
            per_rank = _gather(mine, dist)  # every rank's RNG and partial loss (DDP), rank 0 writes
            if not dist.is_main:
                return
            ckpt.save(
                ckpt_file,
                {
                    "run_ids": run_ids,
                    "configs": [c.to_dict() for c in configs],
                    "loop": loop.state_dict(total_s=loop.earlier_s + time.perf_counter() - t_start),
                    "population": pop.state_dict(),
                    "per_rank": per_rank,
                    "started_at": records[0]["started_at"],
                    "errors": [rec["error"] for rec in records],  # (diverged models')
                    "saved_at": utc_now(),
                    "resumes": records[0]["checkpointing"]["resumes"],
                },
            )

        # -- the loop
        n_train = len(ds.train_y)
        startup_s = seconds_since_process_start()  # python start to the first step (this attempt)
        t_loop = time.perf_counter()
        while loop.iteration < cfg.iters:
            if lr_scale is not None:  # a function of the step alone: a resumed run continues it exactly
                pop.set_lr_scale(lr_scale(loop.iteration))
            pop.step(loop.next_batch(n_train, cfg.batch_size, device), loop.loss_sum)
            loop.iteration += 1
            loop.loss_count += 1
            it = loop.iteration

            if it % cfg.eval_every == 0 or it == cfg.iters:
                synchronize(device)
                t_eval = time.perf_counter()
                loop.train_s += t_eval - t_loop
                all_reduce_sum(loop.loss_sum)
                train_losses = (loop.loss_sum / (loop.loss_count * dist.world_size)).tolist()
                accs, test_losses = evaluate(pop, ds.test_x, ds.test_y, dist)
                for m in range(n):
                    # -- divergence: a non-finite loss (recorded as null) fails this model's record
                    losses = {"train": train_losses[m], "test": test_losses[m]}
                    bad = [(k, v) for k, v in losses.items() if not math.isfinite(v)]
                    if bad and diverged_at(histories[m]) is None:
                        what = f"{bad[0][0]} loss became {'NaN' if math.isnan(bad[0][1]) else 'infinite'}"
                        records[m]["error"] = diverged_error(configs[m], it, what)
                    histories[m].append(
                        {
                            "iteration": it,
                            "epoch": round(it / cfg.iters_per_epoch, 4),
                            "train_loss": _rounded(train_losses[m], 6),
                            "test_loss": _rounded(test_losses[m], 6),
                            "test_accuracy": _rounded(accs[m], 4),
                        }
                    )
                    tb.add(m, histories[m][-1])
                loop.loss_sum.zero_()
                loop.loss_count = 0
                if dist.is_main:
                    _report(progress, it, cfg.iters, train_losses, test_losses, accs)
                t_loop = time.perf_counter()
                loop.eval_s += t_loop - t_eval
                if all(diverged_at(h) is not None for h in histories):
                    break  # every model diverged: nothing left worth training (same on every rank)
            elif progress is not None and it % 25 == 0 and dist.is_main and not dist.distributed:
                progress(Progress(it, cfg.iters, (loop.loss_sum / loop.loss_count).mean().item()))

            if it == cfg.iters:
                break
            stopping = _stop_requested(stop, it, dist, device)
            if stopping or (every and it % every == 0):
                synchronize(device)
                t_ckpt = time.perf_counter()
                loop.train_s += t_ckpt - t_loop
                save_checkpoint()
                t_loop = time.perf_counter()
                loop.checkpoint_s += t_loop - t_ckpt
                if stopping:
                    if dist.is_main:
                        print(f"stopping at iteration {it}: checkpoint written to {ckpt_file}", flush=True)
                    raise Interrupted(it, stop.signum if stop is not None else None)
        synchronize(device)
        loop.train_s += time.perf_counter() - t_loop
        if dist.is_main:
            for m, path in enumerate(paths):
                if run_ids[m] in attempt.carried:
                    continue
                if diverged_at(histories[m]) is None:  # (a diverged model's weights are NaN: not kept)
                    save_weights(pop.weights(m), path.with_suffix(".pt"))

    it, train_s = loop.iteration, loop.train_s
    fallback = getattr(pop, "fallback", None)  # graphs.Graphed whose capture failed: it ran eagerly
    for rec, history, path, c in zip(records, histories, paths, configs):
        if fallback:
            rec["env"].update(cuda_graphs=False, cuda_graphs_note=fallback)
        final = history[-1]
        rec["model_path"] = str(path.with_suffix(".pt"))
        rec["metrics"] = {
            "test_accuracy": final["test_accuracy"],
            "test_loss": final["test_loss"],
            "final_train_loss": final["train_loss"],
            "iterations": it,
            "epochs": round(it / cfg.iters_per_epoch, 4),
            "history": history,
        }
        at = diverged_at(history)
        if at is not None:  # no final metrics and no weights; the history says how it went
            if rec["error"] is None:  # it diverged before the checkpoint this attempt resumed from
                rec["error"] = diverged_error(c, at, "a loss became NaN or infinite")
            rec["model_path"] = None
            rec["metrics"].update(
                test_accuracy=None, test_loss=None, final_train_loss=None, diverged_at_iteration=at
            )
        rec["timings"] = {
            "data_load_s": round(data_load_s, 4),
            "rendezvous_s": round(rendezvous_s, 4),
            "train_s": round(train_s, 4),
            "eval_s": round(loop.eval_s, 4),
            "checkpoint_s": round(loop.checkpoint_s, 4),
            "samples_per_s": round(it * cfg.batch_size / train_s, 1) if train_s > 0 else None,
            "startup_s": round(startup_s, 3) if startup_s is not None else None,
        }
        if loop.earlier_s:
            rec["timings"]["earlier_attempts_s"] = round(loop.earlier_s, 4)  # total_s includes them


def _rounded(v: float, digits: int) -> float | None:
    """A history value: rounded, or None (null in the JSON) when not finite."""
    return round(v, digits) if math.isfinite(v) else None


def diverged_at(history: list[dict[str, Any]]) -> int | None:
    """The iteration of the first evaluation with a non-finite (null) train or test loss, if any."""
    for h in history:
        if h.get("train_loss") is None or h.get("test_loss") is None:
            return h["iteration"]
    return None


def diverged_error(config: TrainConfig, iteration: int, what: str) -> dict[str, Any]:
    """The error of a diverged run's record."""
    hint = f"lr {config.lr:g}" + (f", weight decay {config.weight_decay:g}" if config.weight_decay else "")
    return {
        "type": "Diverged",
        "message": f"{what} at iteration {iteration} ({hint}); lower --lr",
        "traceback": None,
    }


def _report(progress, it, total, train_losses, test_losses, accs) -> None:
    """An evaluation, to the progress callback or as one log line (a pack's: means, min and max)."""
    n = len(accs)
    mean_loss, mean_acc = sum(train_losses) / n, sum(accs) / n
    if n == 1:
        line = (
            f"iter {it}/{total}  train_loss {mean_loss:.4f}  test_loss {test_losses[0]:.4f}  "
            f"test_acc {mean_acc:.2f}%"
        )
    else:
        line = (
            f"iter {it}/{total}  pack of {n}  train_loss mean {mean_loss:.4f}  "
            f"test_acc mean {mean_acc:.2f}% (min {min(accs):.2f}, max {max(accs):.2f})"
        )
    if progress is not None:
        progress(Progress(it, total, mean_loss, mean_acc, line))
    else:
        print(line, flush=True)


def _stop_requested(stop: StopFlag | None, it: int, dist: DistInfo, device: torch.device) -> bool:
    """Whether to checkpoint and stop now. Under DDP every rank must stop at the same iteration, so the
    ranks agree (a sum over ranks) every STOP_POLL_DDP iterations: one rank's signal stops them all."""
    if stop is None:
        return False
    if not dist.distributed:
        return stop.is_set()
    if it % STOP_POLL_DDP:
        return False
    flag = torch.tensor(float(stop.is_set()), device=device)
    all_reduce_sum(flag)
    return flag.item() > 0


def _gather(obj: Any, dist: DistInfo) -> list[Any]:
    """One object per rank, in rank order, on every rank ([obj] without DDP)."""
    if not dist.distributed:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out
