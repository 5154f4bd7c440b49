"""Checkpoints: everything a run (or a pack of runs) needs to carry on exactly where it stopped, in one
atomic file.

`<run_id>.ckpt.pt` sits beside a lone run's result; a pack's is `pack-<hash of its run ids>.ckpt.pt`,
one file for all its models, so the pack's runs can never be found at different iterations. It holds the
training loop's state (`train.LoopState`: iteration, histories, loss accumulators, the shuffling
generators, the rest of the epoch's batches, timings), the population's (`population.make_population`:
models, optimizers, a pack's per-model dropout RNG states) and every rank's RNG states (torch CPU, CUDA
or MPS, python `random`) and partial loss: enough for a resumed run to give bit for bit the history of
an uninterrupted one (on the CPU; CUDA kernels may not be deterministic). It is rewritten atomically
(temp file, fsync, rename) every `--checkpoint-every` iterations and when the job is told to stop
(preemption, time limit, scancel, scontrol requeue), so the file on disk is always the newest complete
checkpoint. A file that cannot be read, or belongs to another config, is ignored with a warning and
never loaded. Once the completed result is written the checkpoint is deleted, and so is any other one
in the folder that no run needs any more (`remove_finished`).

The names (`checkpoint_path`, `population_path`) are torch-free: the login node's planner looks for
checkpoints to keep a checkpointed pack together (sweepdir.resumable_packs) without importing torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrainConfig
from .results import atomic_write_bytes, result_path

if TYPE_CHECKING:
    import torch

CKPT_KIND = "mnist-jobs/checkpoint"
CKPT_FORMAT = 3  # 3: lone optimizers are optim.py's (2: torch.optim; 1: per run): older files are ignored
SUFFIX = ".ckpt.pt"
SHORT_RUN = 2000  # runs shorter than this are not checkpointed periodically (they restart in seconds)
MIN_EVERY = 1000  # default: every max(1000, iters / 20) iterations
MAX_PER_RUN = 20


def checkpoint_path(results_dir: Path | str, run_id: str) -> Path:
    return Path(results_dir) / f"{run_id}{SUFFIX}"


def population_path(results_dir: Path | str, run_ids: list[str]) -> Path:
    """A lone run's checkpoint is `<run_id>.ckpt.pt`; a pack's is named after its members."""
    if len(run_ids) == 1:
        return checkpoint_path(results_dir, run_ids[0])
    digest = hashlib.sha256("\n".join(run_ids).encode()).hexdigest()[:12]
    return Path(results_dir) / f"pack-{digest}{SUFFIX}"


def resolve_every(every: int | None, iters: int) -> int:
    """--checkpoint-every: None means the default rule: off below 2000 iterations, else every
    max(1000, iters / 20) iterations (at most 20 checkpoints, each ~10-20 ms for these models)."""
    if every is None:
        return 0 if iters < SHORT_RUN else max(MIN_EVERY, -(-iters // MAX_PER_RUN))
    return max(0, int(every))


def remove_finished(folder: Path | str, mine: Sequence[str] = ()) -> list[Path]:
    """Remove the checkpoints in `folder` that no run needs any more, and return them: those all of
    whose runs have a completed result written after the checkpoint was, and none of which is
    training now (claimed; the caller's own runs, `mine`, just completed, are its claims).

    So a pack checkpoint that the planner could not resume goes once its last run is completed
    elsewhere (its runs regrouped: swept again in a grid without one of them, or --force);
    a lone checkpoint left by an earlier lone attempt goes once its run completes in a pack. A
    checkpoint written after its run's result (a --force rerun's) is kept, and so is one that cannot
    be read (`load` warns when a run meets it)."""
    import torch

    from .claims import result_status, run_is_claimed

    folder, mine = Path(folder), set(mine)
    removed = []
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        try:
            written = path.stat().st_mtime
            if path.name.startswith("pack-"):
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                run_ids = [str(r) for r in state["run_ids"]]
            else:
                run_ids = [path.name[: -len(SUFFIX)]]
            done = all(
                result_status(folder, r)[0] == "completed"
                and result_path(folder, r).stat().st_mtime > written
                and (r in mine or not run_is_claimed(folder, r))
                for r in run_ids
            )
        except Exception:  # unreadable, or gone meanwhile: not this function's to judge
            continue
        if done:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random number generators (the shuffling generator is saved separately)."""
    import torch

    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "mps": torch.mps.get_rng_state() if device.type == "mps" else None,
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    import torch

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
    import torch

    buf = io.BytesIO()
    torch.save({"kind": CKPT_KIND, "format": CKPT_FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: Path, configs: list[TrainConfig], run_ids: list[str]) -> dict[str, Any] | None:
    """The checkpoint at `path` if there is a usable one for these runs, else None (with a warning when
    a file exists but is corrupt, foreign or from other runs or configs: it is never loaded)."""
    import torch

    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("kind") != CKPT_KIND:
            raise ValueError("not an mnist-jobs checkpoint")
        if state.get("format") != CKPT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r}, this version reads {CKPT_FORMAT}")
        saved = [TrainConfig.from_dict(c).config_id() for c in state["configs"]]
        if saved != [c.config_id() for c in configs]:
            raise ValueError("it belongs to another config")
        if list(state.get("run_ids", ())) != list(run_ids):
            raise ValueError(f"it belongs to other runs ({', '.join(map(str, state.get('run_ids', ())))})")
        for key in ("loop", "population", "per_rank"):
            if key not in state:
                raise ValueError(f"missing {key!r}")
        if not 0 < int(state["loop"]["iteration"]) <= configs[0].iters:
            raise ValueError(f"iteration {state['loop']['iteration']!r} out of range")
    except Exception as e:  # corrupt, truncated, foreign: ignore, never load
        warnings.warn(f"ignoring unusable checkpoint {path}: {type(e).__name__}: {e}", stacklevel=2)
        return None
    return state
