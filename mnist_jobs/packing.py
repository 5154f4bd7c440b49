"""Packs, planned: which runs may train together (`group_for_packing`, PACK_KEYS) and whether a pack
fits in memory (`check_pack_fits`). Torch-free, so that the login node and a local sweep's CLI can plan
packs without importing torch; `packed.py` trains them.

No typer, rich or submitit in here (and no torch, except to ask CUDA for its free memory).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import TEST_SIZE, TRAIN_SIZE, TrainConfig

# Fields that must be equal within a pack (see `group_for_packing`):
#   model       - one architecture: the parameters are stacked into (N, ...) tensors;
#   batch_size  - the N batches are stacked into one (N, B, ...) tensor, and epochs line up;
#   iters       - the models step in lockstep, all for the same number of steps;
#   eval_every  - evaluations are batched over the pack, so they happen at the same iterations;
#   optimizer   - one update rule over the stacked tensors (SGD and Adam keep different state);
#   device      - one process, one device;
#   schedule, warmup - one lr factor per step for the pack (schedule.lr_scale of the step), applied to
#                 each model's own lr: models with different schedules train in different packs;
#   normalize, deskew - the training images are loaded (deskewed, normalised) once for the pack.
# Per run (per-model optimizer calls, own RNG states): lr, momentum, weight_decay, seed.
# `epochs` is not a key: it is resolved into `iters`, which is.
PACK_KEYS: tuple[str, ...] = (
    "model",
    "optimizer",
    "schedule",
    "warmup",
    "normalize",
    "deskew",
    "batch_size",
    "iters",
    "eval_every",
    "device",
)
PER_RUN_KEYS: tuple[str, ...] = ("lr", "momentum", "weight_decay", "seed")

EVAL_CHUNK = 5000  # test images per forward pass during evaluation (steps.EVAL_CHUNK)
EVAL_BUDGET_BYTES = 256 << 20  # activations of one batched evaluation pass, at most (1 sample/model min)
MEMORY_HEADROOM = 0.9  # a pack may use this fraction of the available memory


class PackError(ValueError):
    """A pack that cannot run: configs that differ in a PACK_KEY, or one too big for the device."""


# ---- grouping ----------------------------------------------------------------------------------


def pack_key(config: TrainConfig) -> tuple[Any, ...]:
    return tuple(getattr(config, k) for k in PACK_KEYS)


def group_for_packing(configs: Sequence[TrainConfig], pack: int) -> list[list[int]]:
    """Split `configs` into packs of at most `pack` runs that share every PACK_KEY.

    Returns lists of indices into `configs`: ascending within a pack, packs ordered by their first
    index. Runs with the same PACK_KEYS are split into ceil(count / pack) packs of near-equal size
    (24 runs at --pack 10 give 8 + 8 + 8, not 10 + 10 + 4), so an array's tasks take about as long.
    """
    if isinstance(pack, bool) or not isinstance(pack, int) or pack < 1:
        raise PackError(f"--pack must be an integer >= 1 (got {pack!r})")
    by_key: dict[tuple[Any, ...], list[int]] = {}
    for i, cfg in enumerate(configs):
        by_key.setdefault(pack_key(cfg), []).append(i)
    groups: list[list[int]] = []
    for members in by_key.values():
        k = -(-len(members) // pack)
        size, extra = divmod(len(members), k)
        start = 0
        for j in range(k):
            end = start + size + (1 if j < extra else 0)
            groups.append(members[start:end])
            start = end
    groups.sort(key=lambda g: g[0])
    return groups


def check_same_pack_keys(configs: Sequence[TrainConfig]) -> None:
    first = configs[0]
    for cfg in configs[1:]:
        for k in PACK_KEYS:
            if getattr(cfg, k) != getattr(first, k):
                raise PackError(
                    f"runs in one pack must share {', '.join(PACK_KEYS)}; "
                    f"got {k}={getattr(first, k)!r} and {k}={getattr(cfg, k)!r}"
                )


# ---- memory ------------------------------------------------------------------------------------


# (parameter count, bytes saved for backward per sample, and per batch) of each model in float32:
# what `packed.traced_model_sizes` measures on the meta device (tests/test_packed.py holds the two
# equal), kept as numbers so that sizing a pack imports no torch (a trace loads torch._dynamo, ~1 s).
MODEL_SIZES: dict[str, tuple[int, int, int]] = {"logreg": (7850, 3136, 0), "cnn": (21840, 60136, 87000)}


def model_sizes(name: str, batch_size: int) -> tuple[int, int]:
    """(parameter count, bytes saved for backward per sample, rounded up) of one model."""
    n_params, per_sample, per_batch = MODEL_SIZES[name]
    return n_params, -(-(per_sample * batch_size + per_batch) // batch_size)


def _dataset_bytes() -> int:
    images = (TRAIN_SIZE + TEST_SIZE) * 28 * 28
    return images * 4 + (TRAIN_SIZE + TEST_SIZE) * 8 + images  # floats, int64 labels, uint8 originals


def eval_sub_chunk(per_sample_bytes: int, n: int) -> int:
    """Test images per vmapped evaluation pass: N models x that many images stay within the budget."""
    return max(1, min(EVAL_CHUNK, EVAL_BUDGET_BYTES // max(1, n * per_sample_bytes)))


def estimate_pack_bytes(config: TrainConfig, n: int) -> int:
    """Peak memory of training `n` copies of `config`'s model together, in bytes (an upper estimate).

    Shared: the dataset on the device. Per model: parameters, gradients, optimizer state and update
    temporaries; the gathered batch; the activations saved for backward, counted three times (saved,
    their gradients, vmap's layout copies).
    Evaluation: EVAL_BUDGET_BYTES of activations (vmapped, one sample per model at least) or one
    model's EVAL_CHUNK images (per model), whichever is more, plus the logits.
    """
    n_params, saved_per_sample = model_sizes(config.model, config.batch_size)
    state = 2 if config.optimizer == "adam" else 1
    per_param = 4 * (1 + 1 + state + 2)
    per_model = (
        n_params * per_param
        + config.batch_size * (28 * 28 * 4 + 8)  # gathered images and labels
        + config.batch_size * saved_per_sample * 3
    )
    eval_act = max(EVAL_BUDGET_BYTES, n * saved_per_sample, EVAL_CHUNK * saved_per_sample)
    eval_logits = n * EVAL_CHUNK * 10 * 4 * 2
    return int(_dataset_bytes() + n * per_model + eval_act + eval_logits)


def available_bytes(device: Any) -> int:
    """Memory a pack may use now on `device` (a torch.device or a name: cpu, cuda, cuda:1, mps): free
    GPU memory on CUDA (torch is asked, and imported, only then), else available RAM (within the
    cgroup's limit, e.g. a SLURM allocation)."""
    if _device_type(device) == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return _available_ram()


def _device_type(device: Any) -> str:
    return getattr(device, "type", None) or str(device).split(":", 1)[0]


def _available_ram() -> int:
    candidates: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    if not candidates:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    try:  # cgroup v2 limit (SLURM's --mem, containers)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            candidates.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    if not candidates:
        raise PackError("cannot tell how much memory this machine has available")
    return min(candidates)


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} PiB"  # pragma: no cover


def max_pack_that_fits(config: TrainConfig, device: Any) -> int:
    budget = available_bytes(device) * MEMORY_HEADROOM
    lo, hi = 0, 1
    while estimate_pack_bytes(config, hi) <= budget and hi < 1 << 40:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate_pack_bytes(config, mid) <= budget else (lo, mid)
    return lo


def check_pack_fits(config: TrainConfig, n: int, device: Any = None) -> None:
    """Raise PackError if `n` models of `config` would not fit in the device's available memory
    (`device`: a torch.device or a name; None: what config.device selects here)."""
    if device is None:
        from .device import select_device

        device = select_device(config.device)
    need = estimate_pack_bytes(config, n)
    have = available_bytes(device)
    if need > have * MEMORY_HEADROOM:
        fits = max_pack_that_fits(config, device)
        hint = f"use --pack {fits} or less" if fits >= 1 else "even one model does not fit"
        raise PackError(
            f"--pack {n}: {n} {config.model} models (batch {config.batch_size}, {config.optimizer}) "
            f"need about {_fmt_bytes(need)} on {device}, but only {_fmt_bytes(have)} is available "
            f"({MEMORY_HEADROOM:.0%} usable); {hint}"
        )
