"""One training run, top to bottom: the callable every job (local, SLURM, sweep task) executes.

    result = train(TrainConfig(lr=0.01), results_dir="results")

writes `results/<run_id>.json` (atomically) and returns the same dict. A run that raises still leaves
a record with status "failed" and the error. No typer, rich or submitit in here: progress goes to an
optional callback (the CLI draws a rich bar with it) or, without one, to plain log lines.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from . import data as mnist_data
from .config import TrainConfig
from .device import device_name, select_device, synchronize
from .models import build_model
from .results import (
    RESULT_KIND,
    SCHEMA_VERSION,
    atomic_write_json,
    environment,
    slurm_environment,
    utc_now,
)

EVAL_CHUNK = 5000  # test images per forward pass during evaluation


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


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy in percent, mean cross-entropy) over a whole split."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    for xs, ys in zip(x.split(EVAL_CHUNK), y.split(EVAL_CHUNK)):
        logits = model(xs)
        loss_sum += F.cross_entropy(logits, ys, reduction="sum").double()
        correct += (logits.argmax(1) == ys).sum()
    model.train(was_training)
    n = len(y)
    return 100.0 * correct.item() / n, loss_sum.item() / n


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
) -> dict[str, Any]:
    """Train one model as `config` says, write its JSON result, return it."""
    run_id = run_id or default_run_id(config)
    path = result_path(results_dir, run_id)
    record = new_record(config, run_id, extra)
    history: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        _run(config, record, history, data_dir, progress, t_start)
        record["status"] = "completed"
    except BaseException as e:
        record["status"] = "failed"
        record["error"] = error_info(e)
        record["metrics"].setdefault("history", history)
        raise
    finally:
        record["finished_at"] = utc_now()
        record["timings"]["total_s"] = round(time.perf_counter() - t_start, 4)
        atomic_write_json(path, record)
        record["result_path"] = str(path)
    return record


def _run(config, record, history, data_dir, progress, t_start) -> None:
    # -- where, and with which randomness
    device = select_device(config.device)
    record["env"].update(
        device=str(device),
        device_name=device_name(device),
        cuda=torch.version.cuda if device.type == "cuda" else None,
        torch_threads=torch.get_num_threads(),
    )
    torch.manual_seed(config.seed)
    shuffle_gen = torch.Generator().manual_seed(config.seed)

    # -- data, decoded once and kept on the device
    ds = mnist_data.load(data_dir, device=device)
    synchronize(device)
    data_load_s = time.perf_counter() - t_start

    # -- model and optimizer
    model = build_model(config.model).to(device)
    optimizer = make_optimizer(config, model.parameters())

    # -- the loop
    train_s = eval_s = 0.0
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    batches: list[torch.Tensor] = []
    it = 0
    t_loop = time.perf_counter()
    while it < config.iters:
        if not batches:
            batches = mnist_data.epoch_batches(len(ds.train_y), config.batch_size, shuffle_gen, device)
            batches.reverse()  # pop() from the end = batches in permutation order
        idx = batches.pop()
        x, y = ds.train_x.index_select(0, idx), ds.train_y.index_select(0, idx)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        it += 1
        loss_sum += loss.detach()
        loss_count += 1

        is_eval = it % config.eval_every == 0 or it == config.iters
        if is_eval or (progress is not None and it % 25 == 0):
            train_loss = (loss_sum / loss_count).item()
        if is_eval:
            synchronize(device)
            t_eval = time.perf_counter()
            train_s += t_eval - t_loop
            acc, test_loss = evaluate(model, ds.test_x, ds.test_y)
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
            if progress is not None:
                progress(Progress(it, config.iters, train_loss, acc))
            else:
                print(
                    f"iter {it}/{config.iters}  train_loss {train_loss:.4f}  "
                    f"test_loss {test_loss:.4f}  test_acc {acc:.2f}%",
                    flush=True,
                )
            t_loop = time.perf_counter()
            eval_s += t_loop - t_eval
        elif progress is not None and it % 25 == 0:
            progress(Progress(it, config.iters, train_loss))
    synchronize(device)
    train_s += time.perf_counter() - t_loop

    final = history[-1]
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
        "samples_per_s": round(it * config.batch_size / train_s, 1) if train_s > 0 else None,
    }
