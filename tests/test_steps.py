"""The logreg closed-form step against autograd: same loss, same updates (to float rounding)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from mnist_jobs import data as mnist_data
from mnist_jobs.config import TrainConfig
from mnist_jobs.device import SINGLE
from mnist_jobs.models import build_model
from mnist_jobs.steps import AutogradStep, LogRegStep, make_step
from mnist_jobs.train import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ds():
    return mnist_data.load(device="cpu")


def _trained(kind, cfg: TrainConfig, ds, steps: int):
    torch.manual_seed(cfg.seed)
    model = build_model("logreg")
    step = kind(cfg, model, ds, SINGLE, CPU)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = mnist_data.epoch_batches(len(ds.train_y), cfg.batch_size, gen, CPU)
    losses = []
    for idx in batches[:steps]:
        loss = torch.zeros(())
        step(idx, loss)
        losses.append(loss.item())
    return model, losses


@pytest.mark.parametrize(
    "opt",
    [
        dict(),  # plain SGD: the fused GEMM update
        dict(momentum=0.9, weight_decay=1e-3),
        dict(optimizer="adam", lr=0.003, weight_decay=1e-4),
    ],
    ids=["sgd", "sgd-momentum-wd", "adam"],
)
def test_closed_form_step_equals_autograd(ds, opt):
    cfg = TrainConfig(device="cpu", **{"lr": 0.05, **opt})
    fast, fast_losses = _trained(LogRegStep, cfg, ds, 30)
    slow, slow_losses = _trained(AutogradStep, cfg, ds, 30)
    assert fast_losses == pytest.approx(slow_losses, rel=1e-5)
    for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
    assert not torch.equal(fast.linear.weight, build_model("logreg").linear.weight)  # it trained


def test_partial_last_batch_and_model_views(ds):
    """batch 256: an epoch ends with a 96-image batch; the model's weight and bias stay views of the
    trained [W b] buffer, so evaluation and state_dict see the current weights."""
    cfg = TrainConfig(device="cpu", batch_size=256, lr=0.1)
    torch.manual_seed(0)
    model = build_model("logreg")
    step = make_step(cfg, model, ds, SINGLE, CPU)
    assert isinstance(step, LogRegStep)
    idx = torch.arange(96)
    loss = torch.zeros(())
    before = model.linear.weight.detach().clone()
    logits = model(ds.train_x[:96])
    expected = F.cross_entropy(logits, ds.train_y[:96]).item()
    step(idx, loss)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert not torch.equal(model.linear.weight, before)
    assert model.linear.weight.data_ptr() == step.wb.data_ptr()


def test_cnn_uses_autograd(ds):
    # (DDP runs use it too: covered by test_ddp's 2-process run against a 1-process one)
    assert isinstance(make_step(TrainConfig(model="cnn"), build_model("cnn"), ds, SINGLE, CPU), AutogradStep)


def test_train_with_closed_form_matches_autograd_run(tmp_path, monkeypatch):
    """A whole run: the closed-form path (the default for logreg) and autograd within 0.1 points."""
    import mnist_jobs.steps as steps_mod

    cfg = TrainConfig(device="cpu", lr=0.1, iters=400, eval_every=200)
    fast = train(cfg, results_dir=tmp_path / "fast", progress=lambda p: None)
    monkeypatch.setattr(steps_mod, "make_step", lambda c, m, d, di, dev, *_: AutogradStep(c, m, d, di, dev))
    slow = train(cfg, results_dir=tmp_path / "slow", progress=lambda p: None)
    assert abs(fast["metrics"]["test_accuracy"] - slow["metrics"]["test_accuracy"]) <= 0.1
    assert fast["metrics"]["test_loss"] == pytest.approx(slow["metrics"]["test_loss"], abs=1e-3)


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3),
        TrainConfig(optimizer="adam", lr=0.01, weight_decay=1e-4),
    ],
    ids=["sgd-momentum-wd", "adam-wd"],
)
def test_lone_optimizer_is_torch_optim_bit_for_bit(config):
    """optim.LoneOptimizer (the CPU's lone optimizer, no torch._dynamo) against torch.optim itself,
    over steps with changing gradients and a changing lr factor."""
    from mnist_jobs.optim import LoneOptimizer

    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(10, 20, generator=g), torch.randn(10, generator=g)]
    theirs = [t.clone() for t in ours]
    opt = LoneOptimizer(config, ours)
    kw = {"lr": config.lr, "weight_decay": config.weight_decay}
    ref = (
        torch.optim.SGD(theirs, momentum=config.momentum, **kw)
        if config.optimizer == "sgd"
        else torch.optim.Adam(theirs, **kw)
    )
    for step in range(6):
        scale = 1.0 / (step + 1)
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.set_lr_scale(scale)
        for group in ref.param_groups:
            group["lr"] = config.lr * scale
        opt.step()
        ref.step()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), step
    state = opt.state_dict()
    again = LoneOptimizer(config, [t.clone() for t in ours])
    again.load_state_dict(state)
    for a, b in zip(again.state_dict()["per_param"], state["per_param"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_lone_optimizer_state_moves_between_the_cpu_and_the_cuda_optimizer(kind):
    """A run checkpointed on CUDA (torch.optim's fused kernels) resumes on a CPU (LoneOptimizer) and
    back: one state format. Here on CPU tensors (torch's fused kernels run on the CPU too); after the
    hand-over both continue alike (up to the fused kernels' rounding)."""
    from mnist_jobs.optim import LoneOptimizer, TorchOptimizer

    config = TrainConfig(optimizer=kind, lr=0.05, momentum=0.9 if kind == "sgd" else 0.0, weight_decay=1e-3)
    g = torch.Generator().manual_seed(1)
    start = [torch.randn(6, 5, generator=g), torch.randn(6, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(8)]

    def run(make_first, make_second):
        params = [t.clone() for t in start]
        opt = make_first(config, params)
        for step, gs in enumerate(grads):
            if step == 4:  # checkpoint and resume with the other implementation
                state = opt.state_dict()
                params = [t.clone() for t in params]
                opt = make_second(config, params)
                opt.load_state_dict(state)
            for p, gr in zip(params, gs):
                p.grad = gr.clone()
            opt.step()
        return params

    alone = run(LoneOptimizer, LoneOptimizer)
    for first, second in ((TorchOptimizer, LoneOptimizer), (LoneOptimizer, TorchOptimizer)):
        for a, b in zip(run(first, second), alone):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not adam's" if kind == "sgd" else "not sgd's"):
        other = replace(config, optimizer="adam" if kind == "sgd" else "sgd", momentum=0.0)
        LoneOptimizer(other, [t.clone() for t in start]).load_state_dict(
            LoneOptimizer(config, [t.clone() for t in start]).state_dict()
        )
