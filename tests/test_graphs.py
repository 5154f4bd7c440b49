"""CUDA graphs (mnist_jobs/graphs.py): every captured path, run on the CPU through the graph's twin and
checked against its eager run; the real capture where a CUDA device is present.

The twin records one step's aten calls (scalars by value, tensors by identity, as a CUDA graph keeps
them) and replays them, so a step that would train wrong when replayed from a graph trains wrong here
too: the negative tests show that it does.
"""

from __future__ import annotations

import signal
from dataclasses import replace

import pytest
import torch

from mnist_jobs import data as mnist_data
from mnist_jobs import graphs
from mnist_jobs.config import TrainConfig
from mnist_jobs.device import SINGLE, DistInfo
from mnist_jobs.population import make_population
from mnist_jobs.train import Interrupted, StopFlag, train, train_pack

LOGREG = TrainConfig(iters=400, eval_every=100)  # the tutorial preset, shorter
CNN = TrainConfig(
    model="cnn", optimizer="adam", lr=0.002, weight_decay=1e-4, batch_size=16, iters=60, eval_every=20,
    schedule="onecycle", warmup=0.2, normalize=True,
)  # fmt: skip


def history(rec: dict) -> list[dict]:
    return rec["metrics"]["history"]


def close(a: list[dict], b: list[dict], tol: float) -> bool:
    keys = ("train_loss", "test_loss")
    return len(a) == len(b) and all(abs(x[k] - y[k]) <= tol * abs(y[k]) for x, y in zip(a, b) for k in keys)


@pytest.mark.parametrize("config", [LOGREG, CNN], ids=["logreg-tutorial", "cnn-adam-onecycle"])
def test_twin_lone_run_equals_eager_bit_for_bit(tmp_path, one_thread, config):
    """A lone run replayed from the twin's graph (after WARMUP eager steps): the same history to the
    last digit - the same kernels on the same tensors, the CNN's dropout drawn in the same order."""
    eager = train(config, results_dir=tmp_path / "e", run_id="r", cuda_graphs=False)
    twin = train(config, results_dir=tmp_path / "t", run_id="r", cuda_graphs="twin")
    assert history(twin) == history(eager)
    assert twin["env"]["cuda_graphs"] is True and twin["env"]["cuda_graphs_note"] is None
    assert eager["env"]["cuda_graphs"] is False and eager["env"]["cuda_graphs_note"] == "turned off"


def test_twin_logreg_under_a_schedule_and_a_pack(tmp_path, one_thread):
    """Under a schedule, plain SGD steps after the graph (the lr is not frozen into it): a lone run and
    a logreg pack (two seeds x two lrs, one with momentum) train as eagerly, up to float rounding."""
    cfg = TrainConfig(iters=300, eval_every=100, schedule="cosine", warmup=0.1, lr=0.05)
    eager = train(cfg, results_dir=tmp_path / "e", run_id="r", cuda_graphs=False)
    twin = train(cfg, results_dir=tmp_path / "t", run_id="r", cuda_graphs="twin")
    assert close(history(twin), history(eager), 1e-4)
    configs = [replace(cfg, lr=lr, seed=s, momentum=m) for lr, m in ((0.05, 0.0), (0.1, 0.5)) for s in (0, 1)]
    ids = [f"p{i}" for i in range(len(configs))]
    packed_eager = train_pack(configs, results_dir=tmp_path / "pe", run_ids=ids, cuda_graphs=False)
    packed_twin = train_pack(configs, results_dir=tmp_path / "pt", run_ids=ids, cuda_graphs="twin")
    for a, b in zip(packed_twin, packed_eager):
        assert a["env"]["cuda_graphs"] is True
        assert close(history(a), history(b), 1e-4)


def test_twin_catches_an_lr_frozen_into_the_graph(one_thread):
    """The negative case: plain SGD fused into the captured GEMM under a schedule freezes the lr of the
    capture step; the twin reproduces that (so its equality above means something)."""
    cfg = TrainConfig(iters=60, schedule="cosine", lr=0.1)
    ds = mnist_data.load(None)
    idx = torch.randint(0, len(ds.train_y), (60, 1, 100), generator=torch.Generator().manual_seed(0))
    from mnist_jobs.schedule import lr_scale

    def weights(fuse_sgd: bool, mode) -> torch.Tensor:
        pop = make_population([cfg], ds, SINGLE, torch.device("cpu"), fuse_sgd=fuse_sgd)
        if mode:
            pop = graphs.wrap(pop, (1, 100), torch.device("cpu"), mode)
        loss = torch.zeros(1)
        for t in range(60):
            pop.set_lr_scale(lr_scale(cfg, t))
            pop.step(idx[t], loss)
        return pop.weights(0)["linear.weight"].clone()

    eager = weights(True, None)
    assert torch.allclose(weights(False, "twin"), eager, rtol=1e-5, atol=1e-6)  # what train() does
    assert not torch.allclose(weights(True, "twin"), eager, rtol=1e-3, atol=1e-4)  # frozen lr: wrong


def test_twin_refuses_a_host_sync_inside_the_step():
    class Syncs:
        n = 1

        def compute(self, idx, loss_sum):
            loss_sum += float(idx.sum().item())  # .item(): a CUDA graph cannot capture it

        def update(self):
            pass

    pop = graphs.wrap(Syncs(), (1, 4), torch.device("cpu"), "twin")
    idx, loss = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1)
    for _ in range(graphs.WARMUP):
        pop.step(idx, loss)
    with pytest.raises(RuntimeError, match="syncs with the host"):
        pop.step(idx, loss)


def test_a_capture_that_fails_on_the_gpu_goes_on_eagerly(one_thread, capsys):
    """A CUDA capture runs nothing, so when it fails (an op a graph cannot hold) the step is still to
    do: it runs eagerly, as every later one, with one warning. (A backend that fails as CUDA's does.)"""

    class FailingCapture(graphs.TwinGraph):
        executes_on_capture = False

        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

    ds = mnist_data.load(None)
    idx = torch.randint(0, len(ds.train_y), (12, 1, 100), generator=torch.Generator().manual_seed(0))

    def weights(graphed: bool) -> torch.Tensor:
        pop = make_population([LOGREG], ds, SINGLE, torch.device("cpu"))
        if graphed:
            pop = graphs.Graphed(pop, (1, 100), FailingCapture())
        loss = torch.zeros(1)
        for t in range(12):
            pop.step(idx[t], loss)
        return pop, pop.weights(0)["linear.weight"].clone()

    pop, got = weights(True)
    assert torch.equal(got, weights(False)[1])
    assert pop.fallback.startswith("the capture failed, so the run went on eagerly (operation not permitted")
    assert capsys.readouterr().err.count("warning: CUDA graphs:") == 1


def test_twin_partial_batches_run_eagerly(tmp_path, one_thread):
    """An epoch's last batch (60000 % 9999 = 6 samples, step 7) is another shape: eager, and the graph
    goes on (steps 4-6 and 8 are replays)."""
    cfg = TrainConfig(batch_size=9999, iters=8, eval_every=4, lr=0.01)  # one epoch is 7 steps
    eager = train(cfg, results_dir=tmp_path / "e", run_id="r", cuda_graphs=False)
    twin = train(cfg, results_dir=tmp_path / "t", run_id="r", cuda_graphs="twin")
    assert history(twin) == history(eager)


def test_twin_run_stopped_and_resumed_equals_uninterrupted(tmp_path, one_thread):
    """A graphed CNN run stopped mid-schedule resumes (a new capture after its warm-up) bit for bit."""
    straight = train(CNN, results_dir=tmp_path / "s", run_id="r", cuda_graphs="twin")
    stop = StopFlag()

    def progress(p):
        if p.iteration >= 25:
            stop.request(signal.SIGUSR2)

    with pytest.raises(Interrupted):
        train(CNN, results_dir=tmp_path / "r", run_id="r", stop=stop, progress=progress, cuda_graphs="twin")
    resumed = train(CNN, results_dir=tmp_path / "r", run_id="r", cuda_graphs="twin")
    assert resumed["checkpointing"]["resumed_from_iteration"] == 25
    assert history(resumed) == history(straight)


def test_why_not_names_what_runs_eagerly(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    ddp = DistInfo(rank=0, world_size=2, local_world_size=2)
    assert graphs.why_not([LOGREG], SINGLE, cpu) == "not a CUDA device (cpu)"
    assert graphs.why_not([LOGREG], SINGLE, cuda) is None
    assert graphs.why_not([LOGREG, replace(LOGREG, seed=1)], SINGLE, cuda) is None  # a logreg pack
    assert graphs.why_not([CNN], ddp, cuda) == "DDP (the backward pass all-reduces)"
    assert "cnn pack" in graphs.why_not([CNN, replace(CNN, seed=1)], SINGLE, cuda)
    assert graphs.why_not([LOGREG], SINGLE, cuda, False) == "turned off"
    monkeypatch.setenv(graphs.ENV, "0")
    assert graphs.why_not([LOGREG], SINGLE, cuda) == "turned off (MNIST_JOBS_CUDA_GRAPHS=0)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", [LOGREG, CNN], ids=["logreg-tutorial", "cnn-adam-onecycle"])
def test_cuda_graphs_train_as_eager_on_the_gpu(tmp_path, config):
    """The real capture against eager CUDA. logreg draws no random numbers: the same losses to float
    rounding. The CNN's dropout under a graph comes from the same generator but through the graph's
    own offsets, so its masks may differ from eager ones: the same training, statistically."""
    eager = train(replace(config, device="cuda"), results_dir=tmp_path / "e", run_id="r", cuda_graphs=False)
    graphed = train(replace(config, device="cuda"), results_dir=tmp_path / "g", run_id="r")
    assert graphed["env"]["cuda_graphs"] is True and eager["env"]["cuda_graphs"] is False
    if config.model == "logreg":
        assert close(history(graphed), history(eager), 1e-3)
    else:
        assert abs(graphed["metrics"]["test_accuracy"] - eager["metrics"]["test_accuracy"]) < 3.0
        assert close(history(graphed), history(eager), 0.15)
