"""Learning-rate schedules: the lr of every step as a pure function of (step, config). No torch here.

    scale = lr_scale(config, t)      # step t (0-based) trains with config.lr * scale

train()'s loop calls it once per step and hands the factor to the population (`set_lr_scale`), which
multiplies each model's own base lr by it: the lone step, DDP ranks and packs all take their lr from
this one function. Nothing of a schedule is state, so a resumed run continues its schedule exactly:
the step number alone says where it is (a checkpoint carries the iteration).

`--schedule` (TrainConfig.schedule), with `--warmup F` a fraction of the run's iterations, in [0, 1):

constant   lr; with a warm-up, linear from lr / W to lr over the first W = round(F * iters) steps.
cosine     the same warm-up, then cosine annealing from lr to 0 over the steps left
           (torch's CosineAnnealingLR with T_max = iters - W, eta_min 0).
onecycle   torch's OneCycleLR (anneal_strategy "cos", no momentum cycling): cosine from lr / 25 up to
           lr over the first F * iters steps (F defaults to 0.3, OneCycleLR's pct_start), then cosine
           down to lr / 25e4 at the last step.

The tutorial preset is `constant` with no warm-up: `lr_scale_fn` returns None and nothing is applied.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .config import TrainConfig

ONECYCLE_DIV = 25.0  # OneCycleLR's div_factor: the first step's lr is lr / 25
ONECYCLE_FINAL_DIV = 1e4  # OneCycleLR's final_div_factor: the last step's is lr / 25 / 1e4


def warmup_steps(config: TrainConfig) -> int:
    """Warm-up steps of the constant and cosine schedules."""
    return round(config.warmup * config.iters)


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def lr_scale(config: TrainConfig, t: int) -> float:
    """The factor on config.lr at step t (0 <= t < config.iters: the (t+1)-th optimizer step)."""
    if config.schedule == "onecycle":
        initial = 1.0 / ONECYCLE_DIV
        up_end = config.warmup * config.iters - 1  # OneCycleLR's phases, as floats
        if t <= up_end:
            return _cos_anneal(initial, 1.0, t / up_end if up_end > 0 else 1.0)
        span = config.iters - 1 - up_end
        return _cos_anneal(1.0, initial / ONECYCLE_FINAL_DIV, (t - up_end) / span if span > 0 else 1.0)
    w = warmup_steps(config)
    if t < w:
        return (t + 1) / w
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (t - w) / max(1, config.iters - w)))
    return 1.0


def lr_scale_fn(config: TrainConfig) -> Callable[[int], float] | None:
    """`lr_scale` for this config's steps, or None when every step's factor is 1 (constant, no warm-up:
    the loop then leaves the optimizers' lr alone, as before schedules existed)."""
    if config.schedule == "constant" and warmup_steps(config) == 0:
        return None
    return lambda t: lr_scale(config, t)
