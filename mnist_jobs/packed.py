"""Packs: many small configurations of one model trained together in one process.

    records = train.train_pack(configs, results_dir="results", run_ids=ids)

train()'s one loop trains a pack as it trains a lone run (checkpoints, signals, requeue, weights and
records are the loop's); what is specific to training packs lives here: the stacked models and how they
step (`_LogRegPack`, `_Pack`, made by `population.make_population`) and the packed optimizers. Planning packs
(grouping a grid, PACK_KEYS, memory sizing) is torch-free, in `packing.py`.

The N models' parameters are stacked into (N, ...) tensors and trained in
lockstep: the data is loaded once, each step gathers all N batches in one index, computes the N losses
and gradients, and updates all N models with one set of batched (`torch._foreach_*`) optimizer calls.
Each model keeps its own learning rate, momentum, weight decay and seed, and computes exactly what it
would alone:

* its initial weights are `torch.manual_seed(seed); build_model(name)`, as in `train`;
* it draws its own batch order from `torch.Generator().manual_seed(seed)` via `data.epoch_batches`;
* its loss is its own mean cross-entropy (the pack minimises the sum, so each gradient is the lone one);
* the optimizer is torch.optim's single-tensor SGD / Adam, applied to each model's slice with that
  model's hyperparameters, kernel call for kernel call;
* the CNN's dropout noise is drawn per model by the same `F.dropout2d` / `F.dropout` calls, in the same
  order and shapes, from the default generator set to that model's own RNG state (its lone run's
  state after `build_model`, carried from step to step): the lone run's masks, on CPU and CUDA alike.

How the maths is batched. logreg (`_LogRegPack`, the closed-form step of `steps.logreg_step`): by
default models that share a seed - and so their batches - share one GEMM per step, one bmm over all
seed groups; with exact=True each model makes its lone run's own calls. CNN (`_Pack`): by default on
CPU ("exact") each model's convolutions / GEMMs are its lone run's own calls on its slice of the
stacked parameters, everything else batched; on GPUs (exact=False) one `torch.func.vmap` over a
functional copy of the CNN's forward (grouped convolutions, batched GEMMs).

Result: exact runs on CPU are bit-identical to lone runs (same history, to the last digit); the
batched / seed-grouped ones match up to float rounding (and a GPU's own run-to-run nondeterminism),
which training amplifies like any perturbation: a few tenths of a point early in training at high lr
for the CNN; 0.01 points for the 24-run logreg grid.

No typer, rich or submitit in here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from .config import TrainConfig
from .models import build_model, cnn_noise
from .optim import make_packed_optimizer
from .packing import eval_sub_chunk, model_sizes
from .steps import ROW, logreg_step


def traced_model_sizes(name: str, batch_size: int) -> tuple[int, int]:
    """(parameter count, bytes saved for backward per sample) of one model, traced on the meta device
    (no memory, no RNG draws): what packing.MODEL_SIZES holds, checked by tests/test_packed.py."""
    saved = 0

    def pack_hook(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.device("meta"):
        model = build_model(name)
        n_params = sum(p.numel() for p in model.parameters())
        x = torch.empty(batch_size, 1, 28, 28)
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            model(x)
    return n_params, -(-saved // batch_size)


# ---- the models, functionally, over a leading model dimension -----------------------------------


def _cnn_forward(p: dict[str, torch.Tensor], x: torch.Tensor, *masks: torch.Tensor) -> torch.Tensor:
    """models.CNN.forward with the dropout noise passed in (masks = (drop2d, drop) in training; none
    in evaluation). Dropout there is `input * noise`, noise = bernoulli(1 - p) / (1 - p): the same."""
    x = F.relu(F.max_pool2d(F.conv2d(x, p["conv1.weight"], p["conv1.bias"]), 2))
    x = F.conv2d(x, p["conv2.weight"], p["conv2.bias"])
    if masks:
        x = x * masks[0]
    x = F.relu(F.max_pool2d(x, 2))
    x = F.relu(F.linear(x.flatten(1), p["fc1.weight"], p["fc1.bias"]))
    if masks:
        x = x * masks[1]
    return F.linear(x, p["fc2.weight"], p["fc2.bias"])


# forward of one model, and the maker of its dropout noise for one training step (None: no dropout)
FORWARDS: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., list[torch.Tensor]] | None]] = {
    "cnn": (_cnn_forward, cnn_noise),
}


class _DefaultRng:
    """get/set the state of the default generator that a lone run's dropout draws from on `device`."""

    def __init__(self, device: torch.device):
        self.device = device

    def get(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        if self.device.type == "mps":
            return torch.mps.get_rng_state()
        return torch.get_rng_state()

    def set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        elif self.device.type == "mps":
            torch.mps.set_rng_state(state)
        else:
            torch.set_rng_state(state)


class _Pack:
    """The stacked CNNs: parameters (N, ...), their dropout RNG states, and how a step is computed
    (logreg packs are `_LogRegPack`).

    exact (the default on CPU): every kernel that a lone run calls is called the same way on the same
        shapes - each model's own forward and backward on its slice of the stacked parameters - while
        the data gather, the dropout draws and the optimizer stay batched. Bit-identical on CPU.
    batched (exact=False, the default on GPUs): one call for the pack - `torch.func.vmap` over the
        functional forward (grouped convolutions, batched GEMMs), one autograd pass. Same maths,
        different float rounding. On a CPU the CNN is compute-bound and the grouped convolutions
        are slower than the plain ones, so exact is also faster there.
    """

    def __init__(self, configs: Sequence[TrainConfig], device: torch.device, ds, exact: bool | None = None):
        self.name = configs[0].model
        self.n = len(configs)
        self.device = device
        self.exact = device.type == "cpu" if exact is None else bool(exact)
        self.forward, self.noise = FORWARDS[self.name]
        self.rng = _DefaultRng(device)
        models, self.rng_states = [], []
        for cfg in configs:
            torch.manual_seed(cfg.seed)  # exactly as train(): seed, then build the model
            models.append(build_model(self.name))
            self.rng_states.append(self.rng.get())  # where its lone run's dropout draws start
        self.params = {
            k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]).to(device)
            for k, _ in models[0].named_parameters()
        }
        self.train_fn = torch.func.vmap(self.forward)
        self.eval_fn = torch.func.vmap(self.forward, in_dims=(0, None))
        if not self.exact:
            self.leaves = [v.requires_grad_() for v in self.params.values()]
        # per model, its parameters as views into the stacked tensors (updated in place by the optimizer)
        self.views = [{k: v[m] for k, v in self.params.items()} for m in range(self.n)]
        self.optimizer = make_packed_optimizer(configs, self.params)
        self.x = ds.train_x.flatten(1)  # a 2-D gather is several times faster than a 4-D one on CPU
        self.y = ds.train_y
        self.image_shape = ds.train_x.shape[1:]
        _, saved_per_sample = model_sizes(self.name, configs[0].batch_size)
        self.eval_sub = eval_sub_chunk(saved_per_sample, self.n)

    def step(self, idx: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """One step of every model on its batch idx[m] (N, B); each model's mean loss into loss_sum[m]."""
        self.compute(idx, loss_sum)
        self.update()

    def compute(self, idx: torch.Tensor, loss_sum: torch.Tensor) -> None:
        n, b = idx.shape
        flat = idx.reshape(-1)
        x = self.x.index_select(0, flat).view(n, b, *self.image_shape)
        y = self.y.index_select(0, flat).view(n, b)
        losses, self._grads = self.loss_and_grads(x, y)
        loss_sum += losses

    def update(self) -> None:
        self.optimizer.step(self._grads)

    def set_lr_scale(self, scale: float) -> None:
        """Every model's lr times `scale` from the next step on (the schedule's factor)."""
        self.optimizer.lr_scale = scale

    def weights(self, m: int) -> dict[str, torch.Tensor]:
        return {k: v[m].detach() for k, v in self.params.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "rng_states": [s.clone() for s in self.rng_states],
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():  # in place: the views and the optimizer keep pointing at them
            for k, v in self.params.items():
                v.copy_(state["params"][k])
        self.rng_states = [s.clone() for s in state["rng_states"]]
        self.optimizer.load_state_dict(state["optimizer"], self.device)

    def dropout_masks(self, batch: int) -> list[list[torch.Tensor]]:
        """Per model, its noise tensors for this step, drawn with its own RNG state."""
        if self.noise is None:
            return []
        outside = self.rng.get()
        masks = []
        try:
            for m in range(self.n):
                self.rng.set(self.rng_states[m])
                masks.append(self.noise(batch, self.device))
                self.rng_states[m] = self.rng.get()
        finally:
            self.rng.set(outside)
        return masks

    def loss_and_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step: (each model's mean cross-entropy (N,), gradients of the stacked parameters) for
        images x (N, B, 1, 28, 28) and labels y (N, B). Each model's gradient is its lone gradient
        (a sum of per-model mean losses), and the returned losses are summed as F.cross_entropy does."""
        n, b = y.shape
        masks = self.dropout_masks(b)
        if self.exact:
            losses, grads = [], []
            for m, p in enumerate(self.views):
                leaves = {k: v.requires_grad_() for k, v in ((k, v.detach()) for k, v in p.items())}
                loss = F.cross_entropy(self.forward(leaves, x[m], *masks[m]), y[m])
                grads.append(torch.autograd.grad(loss, list(leaves.values())))
                losses.append(loss.detach())
            return torch.stack(losses), [torch.stack(g) for g in zip(*grads)]
        stacked = [torch.stack(per_kind) for per_kind in zip(*masks)]
        logits = self.train_fn(self.params, x, *stacked)
        logp = F.log_softmax(logits, -1)
        losses = F.nll_loss(logp.view(n * b, -1), y.view(-1), reduction="none").view(n, b).mean(1)
        grads = list(torch.autograd.grad(losses.sum(), self.leaves))
        return self._lone_losses(logp.detach(), y), grads

    def _lone_losses(self, logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each model's batch loss, summed as F.cross_entropy(reduction="mean") sums it (for the log)."""
        if not self.exact:
            return F.nll_loss(logp.flatten(0, 1), y.view(-1), reduction="none").view(y.shape).mean(1)
        return torch.stack([F.nll_loss(logp[m], y[m]) for m in range(self.n)])

    @torch.no_grad()
    def eval_logits(self, xs: torch.Tensor) -> torch.Tensor:
        """(N, len(xs), 10) logits of every model on the shared images `xs`: exact, per model as the
        lone evaluation computes them; else vmapped, `eval_sub` images a pass."""
        if self.exact:
            return torch.stack([self.forward(p, xs) for p in self.views])
        params = {k: v.detach() for k, v in self.params.items()}
        return torch.cat([self.eval_fn(params, part) for part in xs.split(self.eval_sub)], dim=1)


class _LogRegPack:
    """N logreg models as one (N, 10, ROW) buffer of [W b] rows - the layout of `steps.fold_bias` - each
    stepped with the closed-form gradient of `steps.logreg_step`, as its lone run is.

    exact: per model, its lone run's own calls - its gather, `logreg_step`, and torch.optim's
        arithmetic for momentum / weight decay / Adam. Bit-identical to lone runs on CPU.
    grouped (the default): models with the same seed draw the same batches (same generator, same
        seed), so they are stepped together: one gather and one GEMM per seed group - (k*10, 785)
        weights against the group's (B, 785) batch instead of k GEMMs of 10 rows - and one bmm over
        all groups when the groups have equal sizes (a full lr x seed grid). Same maths as alone; the
        float rounding differs (within 0.1 points of lone runs, tested).
    Models are kept in "slots" ordered so that each seed group is contiguous.
    """

    def __init__(
        self, configs: Sequence[TrainConfig], device: torch.device, ds, exact: bool, fuse_sgd: bool = True
    ):
        self.n = n = len(configs)
        self.exact = exact
        self.device = device
        seeds = [c.seed for c in configs]
        first = {sd: seeds.index(sd) for sd in seeds}
        order = sorted(range(n), key=lambda m: (first[seeds[m]], m))  # slot -> model
        self.slot = [0] * n  # model -> slot
        for sl, m in enumerate(order):
            self.slot[m] = sl
        self.buf = torch.zeros(n, 10, ROW, device=device)
        for m, cfg in enumerate(configs):
            torch.manual_seed(cfg.seed)  # exactly as train(): seed, then build the model
            lin = build_model("logreg").linear
            self.buf[self.slot[m], :, :784] = lin.weight.detach().to(device)
            self.buf[self.slot[m], :, 784] = lin.bias.detach().to(device)
        self.wb = [self.buf[self.slot[m], :, :785] for m in range(n)]  # per model, in model order
        self.params = {
            "linear.weight": [self.buf[self.slot[m], :, :784] for m in range(n)],
            "linear.bias": [self.buf[self.slot[m], :, 784] for m in range(n)],
        }
        # groups of slots sharing a seed: (first slot, end slot, the model whose batches they use)
        self.groups = []
        for sl, m in enumerate(order):
            if sl == 0 or seeds[m] != seeds[order[sl - 1]]:
                self.groups.append([sl, sl + 1, m])
            else:
                self.groups[-1][1] = sl + 1
        sizes = {end - start for start, end, _ in self.groups}
        self.uniform = len(sizes) == 1
        self.reps = torch.tensor([m for _, _, m in self.groups], device=device)
        self.slot_models = torch.tensor(order, device=device)

        self.x = ds.train_x.flatten(1)
        self.onehot_t = F.one_hot(ds.train_y, 10).to(self.x.dtype).t().contiguous()
        self.plain = [c.optimizer == "sgd" and c.momentum == 0 and c.weight_decay == 0 for c in configs]
        self.lrs = [c.lr for c in configs]
        self.lr_scale = 1.0  # the schedule's factor on every model's lr (set_lr_scale)
        # the optimizer (torch.optim's arithmetic per model) for the models not stepped by a fused GEMM:
        # exact - the non-plain ones, as alone; grouped - all of them, unless every model is plain SGD;
        # fuse_sgd=False (graphs.py, under a schedule: a captured GEMM would freeze the lr) - all of them
        self.fused = fuse_sgd and (exact or all(self.plain))
        stepped = [m for m in range(n) if not (self.fused and self.plain[m])]
        self.gbuf = torch.zeros(n, 10, ROW, device=device) if stepped else None
        self.grads = [self.gbuf[self.slot[m], :, :785] for m in range(n)] if stepped else []
        self.stepped = stepped
        self.opt = (
            make_packed_optimizer([configs[m] for m in stepped], {"wb": [self.wb[m] for m in stepped]})
            if stepped
            else None
        )
        # grouped + fused: each slot's -lr, broadcast over its gradient rows
        self.neg_lr = torch.tensor([-self.lrs[m] for m in order], device=device)
        batch = configs[0].batch_size
        self.xbuf = torch.zeros(n if exact else len(self.groups), batch, ROW, device=device)
        self.xbuf[:, :, 784] = 1

    def _inputs(self, rows: int, b: int) -> torch.Tensor:
        """A contiguous (rows, b, ROW) input buffer whose 785th column (the bias's input) is 1."""
        if b == self.xbuf.shape[1]:
            return self.xbuf[:rows]
        x = torch.zeros(rows, b, ROW, device=self.device)  # an epoch's last, partial batch
        x[:, :, 784] = 1
        return x

    def step(self, idx: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """One step of every model on its batch idx[m] (N, B); each model's mean loss into loss_sum[m]."""
        self.compute(idx, loss_sum)
        self.update()

    def compute(self, idx: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """The losses, and the gradients into `grads` (fused plain SGD: the update itself)."""
        b = idx.shape[1]
        if self.exact:
            base = self._inputs(self.n, b)
            for m in range(self.n):
                torch.index_select(self.x, 0, idx[m], out=base[m, :, :784])
                yt = self.onehot_t.index_select(1, idx[m])
                lr = self.lrs[m] * self.lr_scale if self.fused and self.plain[m] else None  # as alone
                grad = self.grads[m] if lr is None else None
                logreg_step(self.wb[m], base[m, :, :785], yt, loss_sum[m], lr, grad)
        else:
            reps = idx.index_select(0, self.reps)  # (G, B): each seed group's batch
            base = self._inputs(len(self.groups), b)
            if self.uniform:
                self._group_step(base, reps, 0, self.n, loss_sum)
            else:
                for g, (start, end, _) in enumerate(self.groups):
                    self._group_step(base[g : g + 1], reps[g : g + 1], start, end, loss_sum)

    def update(self) -> None:
        if self.opt is not None:
            self.opt.step([[self.grads[m] for m in self.stepped]])

    def set_lr_scale(self, scale: float) -> None:
        """Every model's lr times `scale` from the next step on (the schedule's factor)."""
        self.lr_scale = scale
        if self.opt is not None:
            self.opt.lr_scale = scale

    def _group_step(self, base, reps, start: int, end: int, loss_sum: torch.Tensor) -> None:
        """Slots start..end, as G equal seed groups of k models sharing the batch reps[g] (G, B)."""
        n_groups, b = reps.shape
        k = (end - start) // n_groups
        rows = reps.reshape(-1)
        torch.index_select(self.x, 0, rows, out=base.view(-1, ROW)[:, :784])
        xb = base[:, :, :785]
        yt = self.onehot_t.index_select(1, rows).view(10, n_groups, b).transpose(0, 1).unsqueeze(1)
        w = self.buf[start:end].view(n_groups, k * 10, ROW)[:, :, :785]
        logp = torch.log_softmax(torch.bmm(w, xb.transpose(1, 2)).view(n_groups, k, 10, b), 2)
        losses = (logp * yt).sum((2, 3)).view(-1).mul_(-1.0 / b)  # per slot
        loss_sum.index_add_(0, self.slot_models[start:end], losses)
        g = logp.exp_().sub_(yt)  # (G, k, 10, B): B * dL/dlogits per model
        if self.fused:
            g.mul_(self.neg_lr[start:end].view(n_groups, k, 1, 1))
            w.baddbmm_(g.view(n_groups, k * 10, b), xb, alpha=self.lr_scale / b)
        else:
            grads = torch.bmm(g.view(n_groups, k * 10, b), xb).mul_(1.0 / b)
            self.gbuf[start:end, :, :785] = grads.view(end - start, 10, 785)

    def weights(self, m: int) -> dict[str, torch.Tensor]:
        return {k: v[m] for k, v in self.params.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"buf": self.buf.clone(), "optimizer": self.opt.state_dict() if self.opt else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buf.copy_(state["buf"])  # in place: the per-model views point into it
        if self.opt is not None:
            self.opt.load_state_dict(state["optimizer"], self.device)

    @torch.no_grad()
    def eval_logits(self, xs: torch.Tensor) -> torch.Tensor:
        """(N, len(xs), 10) logits: exact, per model as the lone evaluation computes them (model(xs));
        else one GEMM for the whole pack."""
        xs = xs.flatten(1)
        if self.exact:
            return torch.stack([F.linear(xs, w, b) for w, b in zip(*self.params.values())])
        w = self.buf.view(self.n * 10, ROW)
        logits = torch.addmm(w[:, 784], xs, w[:, :784].t()).view(len(xs), self.n, 10)
        return logits.permute(1, 0, 2).index_select(0, torch.tensor(self.slot, device=xs.device))
