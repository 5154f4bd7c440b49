"""The lone step: one model (`Lone`, a population of one; population.py) trained on one batch - the
body of train()'s loop for a lone run. (Packs of N models: packed.py.)

Lone          one model: a LogRegStep or an AutogradStep on an nn.Module.

The lone steps, in two implementations:

AutogradStep  any model, one process or DDP: forward, cross-entropy, backward, optimizer.step().
LogRegStep    logreg in one process, without autograd. Linear(784, 10) + cross-entropy has a closed-form
              gradient: dL/dlogits = (softmax - onehot) / B and dL/d[W b] = dL/dlogits^T @ [x 1]. The bias
              is kept as a 785th weight column against a constant-1 input column, so the forward pass is
              one GEMM and plain SGD is one fused GEMM update (addmm_); momentum, weight decay and Adam
              get the gradient and step with their optimizer (optim.py) as usual. The same maths as
              autograd in a third of the calls: about 2x the autograd step on a 2-core CPU (the
              tutorial run: 0.46 s -> 0.22 s), and fewer kernel launches on a GPU. Float rounding
              differs from autograd's (tested to agree).

Both take the batch's indices into the training set and add the batch's mean loss into `loss_sum`, a
0-dim tensor on the device (never read here: no host sync per step). `make_step` picks one.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .config import TrainConfig
from .device import DistInfo
from .models import build_model, cnn_noise
from .optim import make_optimizer


class AutogradStep:
    """forward, loss, backward, step - under DDP on this rank's shard of the global batch."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module, ds, dist: DistInfo, device: torch.device):
        self.model, self.x, self.y, self.dist, self.device = model, ds.train_x, ds.train_y, dist, device
        self.config = config
        self.optimizer = make_optimizer(config, model.parameters())
        self.set_to_none = True  # graphs.Graphed: False, so the gradients stay where the graph wrote them
        self.net = model
        # DDP + dropout: every rank draws the global batch's noise from the shared stream (same seed on
        # every rank) and applies its shard's rows, so each sample is dropped as in the 1-process run
        self.noise = cnn_noise if config.model == "cnn" and dist.distributed else None
        if dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def __call__(self, idx: torch.Tensor, loss_sum: torch.Tensor) -> None:
        self.compute(idx, loss_sum)
        self.update()

    def compute(self, idx: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """The gradients of the batch idx into the parameters' .grad, its mean loss into loss_sum."""
        if self.dist.distributed:
            # This rank's share of the global batch; the loss is normalised by the global batch (DDP
            # averages over ranks), so the update equals the single-process one.
            shard = idx[self.dist.rank :: self.dist.world_size]
            x, y = self.x.index_select(0, shard), self.y.index_select(0, shard)
            kw = {}
            if self.noise is not None:
                kw["masks"] = [
                    n[self.dist.rank :: self.dist.world_size] for n in self.noise(len(idx), self.device)
                ]
            loss = F.cross_entropy(self.net(x, **kw), y, reduction="sum") * (self.dist.world_size / len(idx))
        else:
            x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
            loss = F.cross_entropy(self.net(x), y)
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        loss.backward()
        loss_sum += loss.detach()

    def update(self) -> None:
        self.optimizer.step()

    def set_lr_scale(self, scale: float) -> None:
        self.optimizer.set_lr_scale(scale)


ROW = 800  # floats per row of the (B, 785) inputs and (10, 785) weights: 64-byte aligned rows make the
#           GEMMs about 15 % faster than a leading dimension of 785


def input_buffer(batch_size: int, like: torch.Tensor) -> torch.Tensor:
    """(batch_size, 785) inputs as a view of a (batch_size, ROW) buffer whose 785th column, the bias's
    input, is 1."""
    buf = torch.zeros(batch_size, ROW, dtype=like.dtype, device=like.device)
    buf[:, 784] = 1
    return buf[:, :785]


def fold_bias(linear: torch.nn.Linear) -> torch.Tensor:
    """[W b] as one (10, 785) tensor (a view of a (10, ROW) buffer), and the layer's weight and bias
    turned into views of it, so the model (evaluation, state_dict, checkpoints) always sees the weights
    being trained."""
    buf = torch.zeros(10, ROW, dtype=linear.weight.dtype, device=linear.weight.device)
    buf[:, :784] = linear.weight.detach()
    buf[:, 784] = linear.bias.detach()
    linear.weight.data = buf[:, :784]
    linear.bias.data = buf[:, 784]
    return buf[:, :785]


def logreg_step(
    wb: torch.Tensor,
    xb: torch.Tensor,
    yt: torch.Tensor,
    loss_sum: torch.Tensor,
    sgd_lr: float | None,
    grad_out: torch.Tensor | None = None,
) -> None:
    """One step of Linear + cross-entropy on inputs xb (B, 785) and transposed one-hot labels yt (10, B).

    Adds the batch's mean loss into loss_sum (0-dim). With sgd_lr: wb -= sgd_lr * gradient, fused into
    one GEMM; else the gradient goes into grad_out for an optimizer. The logits are kept transposed,
    (10, B): a softmax over 10 rows of B contiguous values is 5x faster than over B rows of 10.
    Packed runs (exact mode) call this per model."""
    b = xb.shape[0]
    logp = torch.log_softmax(torch.mm(wb, xb.t()), 0)
    loss_sum.view(1).addmv_(logp.view(1, -1), yt.view(-1), alpha=-1.0 / b)  # += mean(-logp[y])
    g = logp.exp_().sub_(yt)  # softmax - onehot = B * dL/dlogits, (10, B)
    if sgd_lr is not None:
        wb.addmm_(g, xb, alpha=-sgd_lr / b)
    else:
        torch.mm(g, xb, out=grad_out)
        grad_out.mul_(1.0 / b)


class LogRegStep:
    """Linear(784, 10) + cross-entropy with its closed-form gradient (see the module docstring)."""

    def __init__(
        self,
        config: TrainConfig,
        model: torch.nn.Module,
        ds,
        dist: DistInfo,
        device: torch.device,
        fuse_sgd: bool = True,
    ):
        self.config = config
        self.x = ds.train_x.flatten(1)  # (n, 784), a view
        self.onehot_t = F.one_hot(ds.train_y, 10).to(self.x.dtype).t().contiguous()  # (10, n)
        self.wb = fold_bias(model.linear)
        plain = config.optimizer == "sgd" and config.momentum == 0 and config.weight_decay == 0
        # plain SGD is fused into the update GEMM: no optimizer object at all
        self.optimizer = None if plain else make_optimizer(config, [self.wb])
        self.sgd_lr = config.lr if plain else None
        # fuse_sgd=False (graphs.Graphed under a schedule): plain SGD steps after the gradient, as
        # param.add_(grad, alpha=-lr), so that the lr of a step is not frozen into the captured GEMM
        self.fused = plain and fuse_sgd
        if not self.fused:
            self.wb.grad = torch.zeros(10, ROW, dtype=self.x.dtype, device=device)[:, :785]
        # gather into preallocated buffers (a fresh 300 KB tensor per step costs an mmap/munmap pair);
        # the inputs' 785th column, the bias's input, stays 1
        self._xb = input_buffer(config.batch_size, self.x)
        self._pixels = self._xb[:, :-1]

    def __call__(self, idx: torch.Tensor, loss_sum: torch.Tensor) -> None:
        self.compute(idx, loss_sum)
        self.update()

    def compute(self, idx: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """The batch's loss into loss_sum, and its gradient into wb.grad (or, fused, the SGD step)."""
        xb, pixels = self._xb, self._pixels
        if idx.shape[0] != xb.shape[0]:  # an epoch's last, partial batch
            xb = xb[: idx.shape[0]]
            pixels = xb[:, :-1]
        torch.index_select(self.x, 0, idx, out=pixels)
        lr = self.sgd_lr if self.fused else None
        logreg_step(self.wb, xb, self.onehot_t.index_select(1, idx), loss_sum, lr, self.wb.grad)

    def update(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
        elif not self.fused:
            self.wb.add_(self.wb.grad, alpha=-self.sgd_lr)

    def set_lr_scale(self, scale: float) -> None:
        if self.optimizer is None:
            self.sgd_lr = self.config.lr * scale  # fused into the update GEMM
        else:
            self.optimizer.set_lr_scale(scale)


def make_step(
    config: TrainConfig,
    model: torch.nn.Module,
    ds,
    dist: DistInfo,
    device: torch.device,
    fuse_sgd: bool = True,
):
    """LogRegStep for logreg in one process; AutogradStep for everything else (the CNN, DDP)."""
    if config.model == "logreg" and not dist.distributed:
        return LogRegStep(config, model, ds, dist, device, fuse_sgd)
    return AutogradStep(config, model, ds, dist, device)


class Lone:
    """A population of one: `build_model` after `manual_seed(seed)`, trained by its `make_step`."""

    n = 1

    def __init__(self, config: TrainConfig, ds, dist: DistInfo, device: torch.device, fuse_sgd: bool = True):
        torch.manual_seed(config.seed)  # same seed on every rank: same init (and dropout stream)
        self.model = build_model(config.model).to(device)
        self._step = make_step(config, self.model, ds, dist, device, fuse_sgd)
        self.optimizer = self._step.optimizer

    def step(self, idx: torch.Tensor, loss_sum: torch.Tensor) -> None:
        self._step(idx[0], loss_sum[0])

    def compute(self, idx: torch.Tensor, loss_sum: torch.Tensor) -> None:
        self._step.compute(idx[0], loss_sum[0])

    def update(self) -> None:
        self._step.update()

    def graph_mode(self) -> None:
        """graphs.Graphed: keep the gradients' tensors across steps (zero them in place)."""
        if isinstance(self._step, AutogradStep):
            self._step.set_to_none = False

    def set_lr_scale(self, scale: float) -> None:
        self._step.set_lr_scale(scale)

    @torch.no_grad()
    def eval_logits(self, xs: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        try:
            return self.model(xs).unsqueeze(0)
        finally:
            self.model.train()

    def weights(self, m: int) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def state_dict(self) -> dict:
        optimizer = self.optimizer.state_dict() if self.optimizer is not None else None
        return {"model": self.model.state_dict(), "optimizer": optimizer}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
