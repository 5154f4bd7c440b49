"""The optimizers: torch.optim's SGD and Adam arithmetic over N >= 1 models, without torch.optim.

    opt = make_optimizer(config, model.parameters())   # a lone run: .step(), .zero_grad(), ...
    opt = make_packed_optimizer(configs, params)       # a pack: .step(grads)

On the CPU a lone run steps with the packed optimizer of a pack of one (`LoneOptimizer`): the same
arithmetic as torch.optim's single-tensor SGD / Adam, kernel call for kernel call (tests/test_packed.py
and test_schedule.py check it bit for bit against torch.optim), without torch.optim, whose first
optimizer object imports torch._dynamo (about 1 s of a CNN task's 2.7 s start-up on a 2-core CPU). On
CUDA a lone run uses torch.optim's fused SGD / Adam (`TorchOptimizer`): one kernel launch per step for
all its tensors.

Both lone optimizers answer the same five calls: step(), zero_grad(set_to_none), set_lr_scale(s) (the
next steps use config.lr * s: the schedule's factor), state_dict(), load_state_dict(state); and their
state is one format, so a run checkpointed on CUDA resumes on a CPU and the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .config import TrainConfig

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam defaults
ADAM_EPS = 1e-8

# torch.optim's single-tensor SGD / Adam (what a lone CPU run uses), applied to each model's slice of the
# stacked tensors with that model's hyperparameters. Every per-tensor operation is the lone run's own
# kernel call on a tensor of the same shape, batched with torch._foreach_* (one call per distinct
# hyperparameter value), so the arithmetic is the lone run's to the bit - including the fused
# multiply-add inside `add_(x, alpha=...)`, which a broadcast over the model dimension would not give.


def _groups(values: Sequence[float], *, skip_zero: bool = False) -> list[tuple[float, list[int]]]:
    """(value, model indices having it), in first-seen order; zero left out if skip_zero."""
    out: dict[float, list[int]] = {}
    for m, v in enumerate(values):
        if not (skip_zero and v == 0):
            out.setdefault(v, []).append(m)
    return list(out.items())


def _per_model(t: torch.Tensor | Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """A stacked (N, ...) tensor's per-model views, or a list of them as given."""
    return t.detach().unbind(0) if isinstance(t, torch.Tensor) else list(t)


def _pick(tensors: Sequence[torch.Tensor], idx: list[int]) -> list[torch.Tensor]:
    return [tensors[m] for m in idx]


def _add_weight_decay(grads, params, wd_groups) -> list[torch.Tensor]:
    """Per model `grad.add(param, alpha=wd)` where wd != 0, else the grad itself (as torch.optim)."""
    out = list(grads)
    for wd, idx in wd_groups:
        for m, t in zip(idx, torch._foreach_add(_pick(grads, idx), _pick(params, idx), alpha=wd)):
            out[m] = t
    return out


class PackedSGD:
    """torch.optim.SGD (dampening 0, no nesterov) with per-model lr, momentum and weight decay."""

    def __init__(self, configs: Sequence[TrainConfig], params: dict[str, torch.Tensor]):
        self.params = [_per_model(p) for p in params.values()]  # per tensor, per model: views
        self.lr_groups = _groups([c.lr for c in configs])
        self.wd_groups = _groups([c.weight_decay for c in configs], skip_zero=True)
        self.mom_models = [m for m, c in enumerate(configs) if c.momentum != 0]
        self.momentum = [configs[m].momentum for m in self.mom_models]
        self.buffers: list[list[torch.Tensor] | None] = [None] * len(self.params)
        self.lr_scale = 1.0  # the schedule's factor: each model steps with lr * lr_scale, as alone

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": [None if b is None else [t.clone() for t in b] for b in self.buffers]}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.buffers = [None if b is None else [t.to(device) for t in b] for b in state["buffers"]]

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        for i, (p, g) in enumerate(zip(self.params, grads)):
            d = _add_weight_decay(_per_model(g), p, self.wd_groups)
            if self.mom_models:
                d_mom = _pick(d, self.mom_models)
                bufs = self.buffers[i]
                if bufs is None:  # first step: buf = grad.detach().clone()
                    bufs = self.buffers[i] = [t.detach().clone() for t in d_mom]
                else:  # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                    torch._foreach_mul_(bufs, self.momentum)
                    torch._foreach_add_(bufs, d_mom, alpha=1)
                for m, buf in zip(self.mom_models, bufs):
                    d[m] = buf
            for lr, idx in self.lr_groups:  # param.add_(grad, alpha=-lr)
                torch._foreach_add_(_pick(p, idx), _pick(d, idx), alpha=-(lr * self.lr_scale))


class PackedAdam:
    """torch.optim.Adam (defaults: betas (0.9, 0.999), eps 1e-8, no amsgrad) with per-model lr and
    weight decay, written as its single-tensor implementation."""

    def __init__(self, configs: Sequence[TrainConfig], params: dict[str, torch.Tensor]):
        self.params = [_per_model(p) for p in params.values()]
        self.lr_groups = _groups([c.lr for c in configs])
        self.wd_groups = _groups([c.weight_decay for c in configs], skip_zero=True)
        self.exp_avg = [[torch.zeros_like(t) for t in p] for p in self.params]
        self.exp_avg_sq = [[torch.zeros_like(t) for t in p] for p in self.params]
        self.steps = 0
        self.lr_scale = 1.0  # the schedule's factor: each model steps with lr * lr_scale, as alone

    def state_dict(self) -> dict[str, Any]:
        copy = (
            [[t.clone() for t in p] for p in self.exp_avg],
            [[t.clone() for t in p] for p in self.exp_avg_sq],
        )
        return {"exp_avg": copy[0], "exp_avg_sq": copy[1], "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.exp_avg = [[t.to(device) for t in p] for p in state["exp_avg"]]
        self.exp_avg_sq = [[t.to(device) for t in p] for p in state["exp_avg_sq"]]
        self.steps = int(state["steps"])

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        beta1, beta2 = ADAM_BETAS
        self.steps += 1
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        for i, (p, g) in enumerate(zip(self.params, grads)):
            d = _add_weight_decay(_per_model(g), p, self.wd_groups)
            exp_avg, exp_avg_sq = self.exp_avg[i], self.exp_avg_sq[i]
            torch._foreach_lerp_(exp_avg, d, 1 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, d, d, value=1 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_div_(denom, bias_correction2_sqrt)
            torch._foreach_add_(denom, ADAM_EPS)
            for lr, idx in self.lr_groups:  # param.addcdiv_(exp_avg, denom, value=-step_size)
                step_size = lr * self.lr_scale / bias_correction1
                torch._foreach_addcdiv_(
                    _pick(p, idx), _pick(exp_avg, idx), _pick(denom, idx), value=-step_size
                )


def make_packed_optimizer(configs: Sequence[TrainConfig], params: dict[str, Any]) -> PackedSGD | PackedAdam:
    """The packed optimizer of `configs` (one per model) over `params` (per kind of tensor: a stacked
    (N, ...) tensor, or a list of the N models' tensors)."""
    return PackedAdam(configs, params) if configs[0].optimizer == "adam" else PackedSGD(configs, params)


# A lone optimizer's state, the same for both (so a run checkpointed on one device resumes on another):
#   {"optimizer": "sgd", "per_param": [{"momentum_buffer": tensor | None}, ...]}
#   {"optimizer": "adam", "steps": n, "per_param": [{"exp_avg": tensor, "exp_avg_sq": tensor}, ...]}


class LoneOptimizer:
    """One model's parameters stepped by the packed optimizer of a pack of one (the CPU default)."""

    def __init__(self, config: TrainConfig, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self.kind = config.optimizer
        self.opt = make_packed_optimizer([config], {str(i): [p] for i, p in enumerate(self.params)})

    def step(self) -> None:
        self.opt.step([[p.grad] for p in self.params])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def set_lr_scale(self, scale: float) -> None:
        self.opt.lr_scale = scale

    def state_dict(self) -> dict[str, Any]:
        if self.kind == "sgd":
            bufs = self.opt.buffers
            return {
                "optimizer": "sgd",
                "per_param": [{"momentum_buffer": None if b is None else b[0].clone()} for b in bufs],
            }
        per_param = [
            {"exp_avg": m[0].clone(), "exp_avg_sq": v[0].clone()}
            for m, v in zip(self.opt.exp_avg, self.opt.exp_avg_sq)
        ]
        return {"optimizer": "adam", "steps": self.opt.steps, "per_param": per_param}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check(state, self.kind, len(self.params))
        dev = self.params[0].device
        if self.kind == "sgd":
            bufs = [s["momentum_buffer"] for s in state["per_param"]]
            self.opt.buffers = [None if b is None else [b.to(dev)] for b in bufs]
        elif state["per_param"]:  # (none: saved before the first step)
            self.opt.exp_avg = [[s["exp_avg"].to(dev)] for s in state["per_param"]]
            self.opt.exp_avg_sq = [[s["exp_avg_sq"].to(dev)] for s in state["per_param"]]
            self.opt.steps = int(state["steps"])


class TorchOptimizer:
    """torch.optim's fused SGD / Adam (CUDA: one launch per step for all tensors)."""

    def __init__(self, config: TrainConfig, params: Sequence[torch.Tensor]):
        self.config, self.kind = config, config.optimizer
        params = list(params)
        kw = {"lr": config.lr, "weight_decay": config.weight_decay, "fused": True}
        if config.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, momentum=config.momentum, **kw)
        else:
            self.opt = torch.optim.Adam(params, **kw)
        self.n_params = len(params)

    def step(self) -> None:
        self.opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def set_lr_scale(self, scale: float) -> None:
        for group in self.opt.param_groups:  # (an lr a checkpoint brings back is overwritten here)
            group["lr"] = self.config.lr * scale

    def state_dict(self) -> dict[str, Any]:
        st = self.opt.state_dict()["state"]
        per = [st.get(i, {}) for i in range(self.n_params)]
        if self.kind == "sgd":
            return {
                "optimizer": "sgd",
                "per_param": [{"momentum_buffer": s.get("momentum_buffer")} for s in per],
            }
        steps = int(per[0]["step"]) if per and "step" in per[0] else 0
        per_param = [{"exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]} for s in per] if steps else []
        return {"optimizer": "adam", "steps": steps, "per_param": per_param}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check(state, self.kind, self.n_params)
        if self.kind == "sgd":
            st = {
                i: {"momentum_buffer": s["momentum_buffer"]}
                for i, s in enumerate(state["per_param"])
                if s["momentum_buffer"] is not None
            }
        else:
            step = float(state["steps"])
            st = (
                {i: {"step": torch.tensor(step), **s} for i, s in enumerate(state["per_param"])}
                if step
                else {}
            )
        self.opt.load_state_dict({"state": st, "param_groups": self.opt.state_dict()["param_groups"]})


def _check(state: dict[str, Any], kind: str, n_params: int) -> None:
    per = state.get("per_param", [])
    if state.get("optimizer") != kind or (per and len(per) != n_params):
        raise ValueError(f"the checkpoint's optimizer state is not {kind}'s for {n_params} tensors")


def make_optimizer(config: TrainConfig, params) -> LoneOptimizer | TorchOptimizer:
    """A lone run's optimizer: torch.optim's fused kernels on CUDA, else the packed arithmetic."""
    params = list(params)
    return (TorchOptimizer if params[0].device.type == "cuda" else LoneOptimizer)(config, params)
