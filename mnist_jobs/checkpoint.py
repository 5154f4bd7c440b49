"""Checkpoints: everything a run needs to carry on exactly where it stopped, in one atomic file.

`<run_id>.ckpt.pt` sits beside the run's result. It holds the model and optimizer state, the RNG
states (torch CPU, CUDA or MPS, python `random`, the shuffling generator), the rest of the current
epoch's batches, the loss accumulators, the history and the timings so far: enough for a resumed run
to give bit for bit the history of an uninterrupted one (on the CPU; CUDA kernels may not be
deterministic). It is rewritten atomically (temp file, fsync, rename) every `--checkpoint-every`
iterations and when the job is told to stop (preemption, time limit, scancel, scontrol requeue), so
the file on disk is always the newest complete checkpoint. A file that cannot be read, or belongs to
another config, is ignored with a warning and never loaded. Once the completed result is written the
checkpoint is deleted.
"""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .results import atomic_write_bytes

CKPT_KIND = "mnist-jobs/checkpoint"
CKPT_FORMAT = 1
SUFFIX = ".ckpt.pt"
SHORT_RUN = 2000  # runs shorter than this are not checkpointed periodically (they restart in seconds)
MIN_EVERY = 1000  # default: every max(1000, iters / 20) iterations
MAX_PER_RUN = 20


def checkpoint_path(results_dir: Path | str, run_id: str) -> Path:
    return Path(results_dir) / f"{run_id}{SUFFIX}"


def resolve_every(every: int | None, iters: int) -> int:
    """--checkpoint-every: None means the default rule: off below 2000 iterations, else every
    max(1000, iters / 20) iterations (at most 20 checkpoints, each ~10-20 ms for these models)."""
    if every is None:
        return 0 if iters < SHORT_RUN else max(MIN_EVERY, -(-iters // MAX_PER_RUN))
    return max(0, int(every))


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random number generators (the shuffling generator is saved separately)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "mps": torch.mps.get_rng_state() if device.type == "mps" else None,
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "mps" and state.get("mps") is not None:
        torch.mps.set_rng_state(state["mps"])
    random.setstate(_as_python_rng_state(state["python"]))


def _as_python_rng_state(state: Any) -> tuple:
    """random.getstate() is (version, tuple of ints, gauss_next); a pickle round trip may give lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save(path: Path, state: dict[str, Any]) -> None:
    """Serialise to memory, then write atomically: a killed process leaves the previous checkpoint."""
    buf = io.BytesIO()
    torch.save({"kind": CKPT_KIND, "format": CKPT_FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint at `path` if there is a usable one for `config`, else None (with a warning when a
    file exists but is corrupt, foreign or from another config: it is never loaded)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("kind") != CKPT_KIND:
            raise ValueError("not an mnist-jobs checkpoint")
        if state.get("format") != CKPT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r}, this version reads {CKPT_FORMAT}")
        saved = TrainConfig.from_dict(state["config"])
        if saved.config_id() != config.config_id():
            raise ValueError("it belongs to another config")
        if not 0 < int(state["iteration"]) <= config.iters:
            raise ValueError(f"iteration {state['iteration']!r} out of range")
        for key in ("model", "optimizer", "per_rank", "shuffle_rng", "batches", "history", "timings"):
            if key not in state:
                raise ValueError(f"missing {key!r}")
    except Exception as e:  # corrupt, truncated, foreign: ignore, never load
        warnings.warn(f"ignoring unusable checkpoint {path}: {type(e).__name__}: {e}", stacklevel=2)
        return None
    return state
