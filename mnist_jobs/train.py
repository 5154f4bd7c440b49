"""One training run, top to bottom: the callable every job (local, SLURM, sweep task) executes.

    result = train(TrainConfig(lr=0.01), results_dir="results")

writes `results/<run_id>.json` (atomically) and returns the same dict. A run that raises still leaves
a record with status "failed" and the error. No typer, rich or submitit in here: progress goes to an
optional callback (the CLI draws a rich bar with it) or, without one, to plain log lines.

Checkpoints (see checkpoint.py): a run finding `results/<run_id>.ckpt.pt` resumes from it; with
`checkpoint_every=N` it writes one every N iterations; when `stop` (an Event the job's signal handlers
set) is set, it writes one at the next iteration boundary and raises `Interrupted`, writing no result.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from . import checkpoint as ckpt
from . import data as mnist_data
from .config import TrainConfig
from .device import SINGLE, DistInfo, all_reduce_sum, device_name, process_group, rank_device, synchronize
from .models import build_model
from .results import (
    RESULT_KIND,
    SCHEMA_VERSION,
    atomic_write_bytes,
    atomic_write_json,
    environment,
    slurm_environment,
    utc_now,
)
from .steps import make_step

EVAL_CHUNK = 5000  # test images per forward pass during evaluation
STOP_POLL_DDP = 20  # under DDP the ranks agree on a stop request every N iterations (one tiny all-reduce)


class Interrupted(Exception):
    """The run was told to stop (preemption, time limit, scancel); it checkpointed first.

    `record` is the unwritten result (status "interrupted"), `signum` the signal that asked for the stop.
    """

    def __init__(self, iteration: int, signum: int | None, record: dict[str, Any] | None = None) -> None:
        super().__init__(f"stopped by signal {signum} after a checkpoint at iteration {iteration}")
        self.iteration = iteration
        self.signum = signum
        self.record = record


class StopFlag(threading.Event):
    """Set from a signal handler: the loop checkpoints at the next iteration boundary and stops."""

    signum: int | None = None

    def request(self, signum: int | None = None) -> None:
        self.signum = signum
        self.set()


@dataclass(frozen=True)
class Progress:
    iteration: int
    total: int
    train_loss: float
    test_accuracy: float | None = None  # set on evaluation steps


ProgressFn = Callable[[Progress], None]


def default_run_id(config: TrainConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return f"{config.model}-{config.config_id()}-{stamp}"


def result_path(results_dir: Path | str, run_id: str) -> Path:
    return Path(results_dir) / f"{run_id}.json"


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dist: DistInfo = SINGLE
) -> tuple[float, float]:
    """(accuracy in percent, mean cross-entropy) over a whole split; sharded over ranks under DDP."""
    was_training = model.training
    model.eval()
    if dist.distributed:
        x, y = x.tensor_split(dist.world_size)[dist.rank], y.tensor_split(dist.world_size)[dist.rank]
    correct = torch.zeros((), dtype=torch.float64, device=x.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    for xs, ys in zip(x.split(EVAL_CHUNK), y.split(EVAL_CHUNK)):
        logits = model(xs)
        loss_sum += F.cross_entropy(logits, ys, reduction="sum").double()
        correct += (logits.argmax(1) == ys).sum()
    n = torch.tensor(float(len(y)), dtype=torch.float64, device=x.device)
    all_reduce_sum(correct, loss_sum, n)
    model.train(was_training)
    return 100.0 * correct.item() / n.item(), loss_sum.item() / n.item()


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The final weights beside the result (state_dict, atomically written)."""
    buf = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, buf)  # not views into one
    atomic_write_bytes(path, buf.getvalue())


def new_record(config: TrainConfig, run_id: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The skeleton of a result file; `train` (and the packed trainer) fill in metrics and timings."""
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
        "distributed": {"world_size": 1, "backend": None, "nodes": 1, "tasks_per_node": 1},
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


def train(
    config: TrainConfig,
    *,
    results_dir: Path | str = "results",
    run_id: str | None = None,
    data_dir: Path | str | None = None,
    progress: ProgressFn | None = None,
    extra: dict[str, Any] | None = None,
    dist: DistInfo = SINGLE,
    checkpoint_every: int | None = 0,
    stop: StopFlag | None = None,
    requeues: int = 0,
    max_requeues: int | None = None,
) -> dict[str, Any]:
    """Train one model as `config` says, write its JSON result (rank 0 only), return it.

    Resumes from `<run_id>.ckpt.pt` when there is a usable one. `checkpoint_every`: N iterations between
    checkpoints (0: none; None: the default rule of `checkpoint.resolve_every`). `requeues` and
    `max_requeues` are only recorded (the job that requeues knows them).
    """
    run_id = run_id or default_run_id(config)
    path = result_path(results_dir, run_id)
    record = new_record(config, run_id, extra)
    record["checkpointing"] = {
        "every": ckpt.resolve_every(checkpoint_every, config.iters),
        "path": str(ckpt.checkpoint_path(results_dir, run_id)),
        "resumed_from_iteration": None,
        "resumes": 0,
        "requeues": requeues,
        "max_requeues": max_requeues,
    }
    history: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        _run(config, record, history, data_dir, progress, t_start, dist, path, stop)
        record["status"] = "completed"
    except Interrupted as e:
        record["status"] = "interrupted"  # not written: the checkpoint carries the run
        record["metrics"].setdefault("history", history)
        e.record = record
        raise
    except BaseException as e:
        record["status"] = "failed"
        record["error"] = error_info(e)
        record["metrics"].setdefault("history", history)
        if dist.distributed:
            _share_rank_error(path, dist, record)
        raise
    finally:
        record["finished_at"] = utc_now()
        earlier = record["timings"].get("earlier_attempts_s", 0.0)  # when resumed: the time before
        record["timings"]["total_s"] = round(time.perf_counter() - t_start + earlier, 4)
        if dist.is_main and record["status"] != "interrupted":
            atomic_write_json(path, record)
        record["result_path"] = str(path)
    if dist.is_main:  # the result is complete and on disk: the checkpoint has done its job
        ckpt.checkpoint_path(results_dir, run_id).unlink(missing_ok=True)
    return record


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


def _run(config, record, history, data_dir, progress, t_start, dist, path, stop) -> None:
    # -- where, and with which randomness
    device = rank_device(config.device, dist)
    if dist.distributed and config.batch_size < dist.world_size:
        raise ValueError(f"--batch-size {config.batch_size} is smaller than the world size {dist.world_size}")
    record["env"].update(
        device=str(device),
        device_name=device_name(device),
        cuda=torch.version.cuda if device.type == "cuda" else None,
        torch_threads=torch.get_num_threads(),
    )
    torch.manual_seed(config.seed)  # same seed on every rank: same init, same batch order
    shuffle_gen = torch.Generator().manual_seed(config.seed)
    ckpt_file = ckpt.checkpoint_path(path.parent, record["run_id"])
    every = record["checkpointing"]["every"]

    with process_group(dist, device) as backend:
        record["distributed"] = {
            "world_size": dist.world_size,
            "backend": backend,
            "nodes": dist.nodes,
            "tasks_per_node": dist.local_world_size,
        }
        # -- data, decoded once and kept on the device
        ds = mnist_data.load(data_dir, device=device)

        # -- model, and the step that trains it with its optimizer (DDP: the same model, wrapped;
        #    gradients are all-reduced), and where an earlier attempt of this run stopped, if it left a
        #    checkpoint
        model = build_model(config.model).to(device)
        step = make_step(config, model, ds, dist, device)
        optimizer = step.optimizer
        synchronize(device)
        data_load_s = time.perf_counter() - t_start
        saved = ckpt.load(ckpt_file, config)  # every rank reads the same file
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        log = (progress is not None or not dist.is_main) and dist.is_main

        # -- the loop's state: fresh, or exactly as the checkpoint left it
        train_s = eval_s = ckpt_s = earlier_s = 0.0
        loss_sum = torch.zeros((), device=device)
        loss_count = 0
        batches: list[torch.Tensor] = []
        it = 0
        if saved is not None:
            it, loss_count = saved["iteration"], saved["loss_count"]
            history[:] = saved["history"]
            remaining, sizes = saved["batches"]
            batches = list(remaining.to(device).split(sizes)) if sizes else []
            shuffle_gen.set_state(saved["shuffle_rng"])
            per_rank = saved["per_rank"]
            mine = per_rank[dist.rank] if len(per_rank) == dist.world_size else per_rank[0]
            ckpt.set_rng_state(mine["rng"], device)
            loss_sum = mine["loss_sum"].to(device)
            timings = saved["timings"]
            train_s, eval_s, ckpt_s = timings["train_s"], timings["eval_s"], timings["checkpoint_s"]
            earlier_s = timings["total_s"]
            record["timings"]["earlier_attempts_s"] = earlier_s
            record["started_at"] = saved["started_at"]
            record["checkpointing"].update(resumed_from_iteration=it, resumes=saved["resumes"] + 1)
            if dist.is_main:
                print(f"resuming {record['run_id']} from {ckpt_file} at iteration {it}", flush=True)

        def save_checkpoint() -> None:
            mine = {"rng": ckpt.rng_state(device), "loss_sum": loss_sum.detach().cpu()}
            per_rank = _gather(mine, dist)  # every rank's RNG and partial loss (DDP), rank 0 writes
            if not dist.is_main:
                return
            ckpt.save(
                ckpt_file,
                {
                    "run_id": record["run_id"],
                    "config": config.to_dict(),
                    "iteration": it,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "shuffle_rng": shuffle_gen.get_state(),
                    "batches": _pack_batches(batches),  # the rest of this epoch, still reversed
                    "per_rank": per_rank,
                    "loss_count": loss_count,
                    "history": history,
                    "timings": {
                        "train_s": train_s,
                        "eval_s": eval_s,
                        "checkpoint_s": ckpt_s,
                        "total_s": earlier_s + time.perf_counter() - t_start,
                    },
                    "started_at": record["started_at"],
                    "saved_at": utc_now(),
                    "resumes": record["checkpointing"]["resumes"],
                },
            )

        # -- the loop
        t_loop = time.perf_counter()
        while it < config.iters:
            if not batches:
                batches = mnist_data.epoch_batches(len(ds.train_y), config.batch_size, shuffle_gen, device)
                batches.reverse()  # pop() from the end = batches in permutation order
            step(batches.pop(), loss_sum)
            it += 1
            loss_count += 1

            is_eval = it % config.eval_every == 0 or it == config.iters
            if is_eval:
                synchronize(device)
                t_eval = time.perf_counter()
                train_s += t_eval - t_loop
                all_reduce_sum(loss_sum)
                train_loss = (loss_sum / (loss_count * dist.world_size)).item()
                acc, test_loss = evaluate(model, ds.test_x, ds.test_y, dist)
                history.append(
                    {
                        "iteration": it,
                        "epoch": round(it / config.iters_per_epoch, 4),
                        "train_loss": round(train_loss, 6),
                        "test_loss": round(test_loss, 6),
                        "test_accuracy": round(acc, 4),
                    }
                )
                loss_sum.zero_()
                loss_count = 0
                if progress is not None and dist.is_main:
                    progress(Progress(it, config.iters, train_loss, acc))
                elif dist.is_main:
                    print(
                        f"iter {it}/{config.iters}  train_loss {train_loss:.4f}  "
                        f"test_loss {test_loss:.4f}  test_acc {acc:.2f}%",
                        flush=True,
                    )
                t_loop = time.perf_counter()
                eval_s += t_loop - t_eval
            elif log and it % 25 == 0 and not dist.distributed:
                progress(Progress(it, config.iters, (loss_sum / loss_count).item()))

            if it == config.iters:
                break
            stopping = _stop_requested(stop, it, dist, device)
            if stopping or (every and it % every == 0):
                synchronize(device)
                t_ckpt = time.perf_counter()
                train_s += t_ckpt - t_loop
                save_checkpoint()
                t_loop = time.perf_counter()
                ckpt_s += t_loop - t_ckpt
                if stopping:
                    if dist.is_main:
                        print(f"stopping at iteration {it}: checkpoint written to {ckpt_file}", flush=True)
                    raise Interrupted(it, stop.signum if stop is not None else None)
        synchronize(device)
        train_s += time.perf_counter() - t_loop
        if dist.is_main:
            save_weights(model, path.with_suffix(".pt"))

    final = history[-1]
    record["model_path"] = str(path.with_suffix(".pt"))
    record["metrics"] = {
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "final_train_loss": final["train_loss"],
        "iterations": it,
        "epochs": round(it / config.iters_per_epoch, 4),
        "history": history,
    }
    record["timings"] = {
        "data_load_s": round(data_load_s, 4),
        "train_s": round(train_s, 4),
        "eval_s": round(eval_s, 4),
        "checkpoint_s": round(ckpt_s, 4),
        "samples_per_s": round(it * config.batch_size / train_s, 1) if train_s > 0 else None,
    }
    if earlier_s:
        record["timings"]["earlier_attempts_s"] = round(earlier_s, 4)  # total_s includes them


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


def _pack_batches(batches: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """The pending index batches as one tensor and their sizes (one tensor saves much faster)."""
    if not batches:
        return torch.zeros(0, dtype=torch.int64), []
    return torch.cat(batches).cpu(), [len(b) for b in batches]


def _gather(obj: Any, dist: DistInfo) -> list[Any]:
    """One object per rank, in rank order, on every rank ([obj] without DDP)."""
    if not dist.distributed:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out
