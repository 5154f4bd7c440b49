"""The population a run trains: one model or a pack, behind one interface - what train()'s loop steps.

    pop = make_population(configs, ds, dist, device)

train()'s loop only ever talks to a population through the same calls: `step(idx, loss_sum)` (idx:
(N, B) batch indices, loss_sum: (N,) running losses), `set_lr_scale(s)` (the next steps train each
model with its own lr times s: the schedule's factor, see schedule.py), `eval_logits(images)` -> (N,
len, 10), `weights(m)` (model m's state_dict, loadable by `build_model(name)`), and `state_dict()` /
`load_state_dict()` for checkpoints. `step` is `compute(idx, loss_sum)` then `update()`; graphs.py
captures the first and replays it.

steps.Lone    one model (a population of one): a LogRegStep or an AutogradStep on an nn.Module.
packed.py     N models stacked: `_LogRegPack` (closed-form logreg, seed-grouped GEMMs) and `_Pack` (the
              CNN: per-model kernels on CPU, vmap on GPUs), with their packed optimizers.
"""

from __future__ import annotations

import torch

from .config import TrainConfig
from .device import DistInfo
from .packed import _LogRegPack, _Pack
from .steps import Lone


def not_graphable(configs: list[TrainConfig], dist: DistInfo) -> str | None:
    """What keeps the population's step out of a CUDA graph (graphs.py), or None: it can be captured."""
    if dist.distributed:
        return "DDP (the backward pass all-reduces)"
    if len(configs) > 1 and configs[0].model != "logreg":
        # each model draws its dropout from its own RNG state, set with torch.cuda.set_rng_state
        # around its draws: a captured graph cannot switch generator states
        return f"a {configs[0].model} pack (each model's dropout has its own RNG state)"
    return None


def make_population(
    configs: list[TrainConfig],
    ds,
    dist: DistInfo,
    device: torch.device,
    exact: bool | None = None,
    fuse_sgd: bool = True,
):
    """The models a run trains and how they step: Lone for one config, a pack for several (configs that
    share packed.PACK_KEYS; `exact` as `packed._Pack` / `_LogRegPack` take it). `fuse_sgd=False`: plain
    SGD updates after the gradient instead of inside its GEMM (graphs.py, under a schedule)."""
    if len(configs) == 1:
        return Lone(configs[0], ds, dist, device, fuse_sgd)
    if dist.distributed:
        raise ValueError("a pack trains in one process: it cannot be combined with DDP (several tasks)")
    if configs[0].model == "logreg":
        return _LogRegPack(configs, device, ds, bool(exact), fuse_sgd)
    return _Pack(configs, device, ds, exact)
