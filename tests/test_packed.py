"""Packed training (issue 7): grouping, memory refusal, result files, failure records, and the main
claim: a packed run gives the answers its configuration gives alone (CPU: bit for bit)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from mnist_jobs.config import TrainConfig
from mnist_jobs.models import build_model
from mnist_jobs.packed import traced_model_sizes
from mnist_jobs.packing import (
    PACK_KEYS,
    PER_RUN_KEYS,
    PackError,
    check_pack_fits,
    estimate_pack_bytes,
    group_for_packing,
    max_pack_that_fits,
    model_sizes,
)
from mnist_jobs.results import load_result
from mnist_jobs.train import Progress, train, train_pack


def quiet(_p) -> None:
    pass


@pytest.fixture
def one_thread():
    """Heavy tests run single-threaded: on a busy 2-core machine two OpenMP threads per process slow
    down several-fold; packed and lone runs compare at the same thread count either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def histories(records):
    return [r["metrics"]["history"] for r in records]


def accuracies(records):
    return [r["metrics"]["test_accuracy"] for r in records]


# ---- grouping ----------------------------------------------------------------------------------


def test_pack_keys_cover_every_field():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"model", "batch_size", "iters", "eval_every", "device", "optimizer"} <= set(PACK_KEYS)
    assert not set(PACK_KEYS) & set(PER_RUN_KEYS)
    assert set(PACK_KEYS) | set(PER_RUN_KEYS) | {"epochs"} == fields  # epochs resolves into iters


def test_group_for_packing_rules():
    cfgs = [TrainConfig(lr=lr, seed=s, iters=100) for lr in (0.1, 0.01, 0.001) for s in range(4)]  # 12
    cfgs.insert(3, TrainConfig(model="cnn", iters=100))  # index 3: another model
    cfgs.append(TrainConfig(batch_size=50, iters=100))  # another batch size
    cfgs.append(TrainConfig(batch_size=50, iters=200))  # another run length
    groups = group_for_packing(cfgs, 5)
    assert sorted(i for g in groups for i in g) == list(range(len(cfgs)))
    for g in groups:
        assert 1 <= len(g) <= 5 and g == sorted(g)
        assert len({tuple(getattr(cfgs[i], k) for k in PACK_KEYS) for i in g}) == 1
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    logreg100 = [g for g in groups if cfgs[g[0]].model == "logreg" and cfgs[g[0]].batch_size == 100]
    assert [len(g) for g in logreg100] == [4, 4, 4]  # 12 at --pack 5: three balanced packs, not 5+5+2
    assert [3] in groups
    assert group_for_packing(cfgs[:4], 1) == [[0], [1], [2], [3]]
    assert group_for_packing(cfgs[:3], 24) == [[0, 1, 2]]
    # epochs=2 at batch 100 is iters=1200: the same run length packs with iters=1200
    same = [TrainConfig(epochs=2), TrainConfig(iters=1200, lr=0.1)]
    assert group_for_packing(same, 2) == [[0, 1]]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(PackError, match="--pack"):
            group_for_packing(cfgs, bad)


# ---- memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["logreg", "cnn"])
def test_the_model_size_table_is_what_a_trace_measures(model):
    """packing.MODEL_SIZES (numbers, so that planning a pack imports no torch) against a meta-device
    trace of the real model, for several batch sizes."""
    for batch in (1, 7, 64, 100, 128, 1000):
        assert model_sizes(model, batch) == traced_model_sizes(model, batch), (model, batch)


def test_planning_packs_imports_no_torch():
    code = (
        "import sys; from mnist_jobs.config import TrainConfig; from mnist_jobs import packing; "
        "packing.group_for_packing([TrainConfig(seed=s) for s in range(4)], 2); "
        "packing.check_pack_fits(TrainConfig(model='cnn'), 4, 'cpu'); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_memory_estimate_and_refusal():
    cfg = TrainConfig(model="cnn", device="cpu")
    state = torch.get_rng_state()
    one, many = estimate_pack_bytes(cfg, 1), estimate_pack_bytes(cfg, 100)
    assert torch.equal(state, torch.get_rng_state())  # sizing draws no random numbers
    assert 200 << 20 < one < many  # the dataset alone is ~220 MB
    assert estimate_pack_bytes(TrainConfig(model="logreg"), 24) < estimate_pack_bytes(cfg, 24)
    check_pack_fits(TrainConfig(device="cpu"), 4, "cpu")  # a small pack fits
    with pytest.raises(PackError) as e:
        check_pack_fits(cfg, 10**7, torch.device("cpu"))
    msg = str(e.value)
    assert "--pack 10000000" in msg and "available" in msg and "use --pack" in msg
    assert isinstance(e.value, ValueError)


# ---- same answers ------------------------------------------------------------------------------


LOGREG_GRID = [  # (lr, momentum, weight_decay, seed)
    (0.01, 0.0, 0.0, 0),
    (0.1, 0.9, 0.0, 1),
    (0.03, 0.5, 1e-3, 2),
    (0.003, 0.0, 5e-4, 3),
]


@pytest.mark.parametrize(
    ("optimizer", "iters", "threads"),
    [("sgd", 250, 1), ("adam", 120, 1), ("sgd", 60, 2)],  # 2 threads: MKL splits each GEMM
)
def test_logreg_packed_is_bit_identical_to_alone(tmp_path, optimizer, iters, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfgs = [
            TrainConfig(
                optimizer=optimizer,
                lr=lr * (0.1 if optimizer == "adam" else 1.0),
                momentum=mom if optimizer == "sgd" else 0.0,
                weight_decay=wd,
                seed=s,
                iters=iters,
                eval_every=iters // 2,
                device="cpu",
            )
            for lr, mom, wd, s in LOGREG_GRID
        ]
        ids = [f"p{i}" for i in range(len(cfgs))]
        packed = train_pack(cfgs, results_dir=tmp_path, run_ids=ids, progress=quiet, exact=True)
        alone = [train(c, results_dir=tmp_path / "alone", progress=quiet) for c in cfgs]
    finally:
        torch.set_num_threads(before)
    assert histories(packed) == histories(alone)  # every loss and accuracy, to the last digit
    assert len(set(accuracies(packed))) > 1  # the configs really differ
    for p, a in zip(packed, alone):  # and the weights each run wrote beside its result
        wp, wa = (torch.load(r["model_path"], weights_only=True) for r in (p, a))
        assert wp.keys() == wa.keys() and all(torch.equal(wp[k], wa[k]) for k in wa)


def _lone_params(cfg: TrainConfig, ds, steps: int) -> dict[str, torch.Tensor]:
    """train()'s loop, bare (seed, model, its step): the parameters after `steps` steps."""
    from mnist_jobs import data as mnist_data
    from mnist_jobs.device import SINGLE
    from mnist_jobs.steps import make_step

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg.model)
    step = make_step(cfg, model, ds, SINGLE, torch.device("cpu"))
    loss_sum = torch.zeros(())
    for idx in mnist_data.epoch_batches(len(ds.train_y), cfg.batch_size, gen, torch.device("cpu"))[:steps]:
        step(idx, loss_sum)
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_logreg_parameters_bit_identical(optimizer, threads):
    """Below the rounded history: the exact pack's parameters equal the lone runs' bit for bit."""
    from mnist_jobs import data as mnist_data
    from mnist_jobs.packed import _LogRegPack

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ds = mnist_data.load(device="cpu")
        cfgs = [
            TrainConfig(
                optimizer=optimizer,
                lr=lr * 0.1,
                momentum=mom * (optimizer == "sgd"),
                weight_decay=wd,
                seed=s,
                device="cpu",
            )
            for lr, mom, wd, s in LOGREG_GRID
        ]
        pack = _LogRegPack(cfgs, torch.device("cpu"), ds, exact=True)
        gens = [torch.Generator().manual_seed(c.seed) for c in cfgs]
        perms = torch.stack([torch.randperm(len(ds.train_y), generator=g) for g in gens])
        steps, b = 40, cfgs[0].batch_size
        loss_sum = torch.zeros(len(cfgs))
        for i in range(steps):
            pack.step(perms[:, i * b : (i + 1) * b], loss_sum)
        for m, cfg in enumerate(cfgs):
            for k, v in _lone_params(cfg, ds, steps).items():
                assert torch.equal(pack.params[k][m], v), (cfg, k)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "grid",
    [
        [dict(lr=lr, seed=s) for lr in (0.01, 0.1, 0.3) for s in (0, 1)],  # equal seed groups: one bmm
        [dict(lr=0.01, seed=0), dict(lr=0.3, seed=4), dict(lr=0.1, seed=0), dict(lr=0.03, seed=0)],  # 3 + 1
        [dict(lr=0.1, momentum=0.9, seed=0), dict(lr=0.01, seed=0), dict(lr=0.03, weight_decay=1e-3, seed=0)],
        [dict(optimizer="adam", lr=lr, seed=s) for lr in (0.001, 0.01) for s in (0, 1)],
    ],
    ids=["lr-x-seed", "unequal-groups", "sgd-mixed", "adam"],
)
def test_logreg_seed_grouped_default_matches_alone(tmp_path, grid):
    """The logreg default: models sharing a seed share their batches' GEMMs. Same batches, same
    initial weights, same updates up to float rounding: within 0.01 points of the lone runs here."""
    cfgs = [TrainConfig(iters=300, eval_every=150, device="cpu", **g) for g in grid]
    ids = [f"g{i}" for i in range(len(cfgs))]
    packed = train_pack(cfgs, results_dir=tmp_path, run_ids=ids, progress=quiet)
    alone = [train(c, results_dir=tmp_path / "alone", progress=quiet) for c in cfgs]
    for p, a in zip(packed, alone):
        assert p["config"] == a["config"]
        assert abs(p["metrics"]["test_accuracy"] - a["metrics"]["test_accuracy"]) <= 0.1
        assert abs(p["metrics"]["test_loss"] - a["metrics"]["test_loss"]) < 1e-3
        assert abs(p["metrics"]["final_train_loss"] - a["metrics"]["final_train_loss"]) < 1e-3
    assert len(set(accuracies(packed))) > 1


def test_logreg_seed_groups_are_formed():
    from mnist_jobs import data as mnist_data
    from mnist_jobs.packed import _LogRegPack

    ds = mnist_data.load(device="cpu")
    cfgs = [TrainConfig(lr=lr, seed=s, device="cpu") for s in (3, 1) for lr in (0.1, 0.2, 0.3)]
    pack = _LogRegPack(cfgs[::-1], torch.device("cpu"), ds, exact=False)
    assert pack.uniform and [e - s for s, e, _ in pack.groups] == [3, 3]
    pack = _LogRegPack(cfgs[:4], torch.device("cpu"), ds, exact=False)
    assert not pack.uniform and [e - s for s, e, _ in pack.groups] == [3, 1]
    # each model starts from its own seed's weights, whatever its slot
    for m, cfg in enumerate(cfgs[:4]):
        torch.manual_seed(cfg.seed)
        assert torch.equal(pack.params["linear.weight"][m], build_model("logreg").linear.weight.detach())


@pytest.mark.parametrize(
    ("model", "grid", "iters"),
    [("cnn", ((0.01, 0), (0.02, 1)), 100), ("logreg", ((0.1, 0), (0.3, 1), (0.01, 2)), 300)],
)
def test_batched_mode_is_close(tmp_path, one_thread, model, grid, iters):
    """The GPU path (exact=False: vmap / grouped convolutions / bmm), run on CPU: same initial models,
    batches and dropout masks, only float rounding differs. Training amplifies rounding like any
    perturbation: at high learning rates early in training CNN accuracies can drift a few tenths;
    at moderate ones they agree within 0.1 point."""
    cfgs = [
        TrainConfig(model=model, lr=lr, seed=s, iters=iters, eval_every=iters // 2, device="cpu")
        for lr, s in grid
    ]
    ids = [f"r{i}" for i in range(len(cfgs))]
    packed = train_pack(cfgs, results_dir=tmp_path, run_ids=ids, progress=quiet, exact=False)
    alone = [train(c, results_dir=tmp_path / "alone", progress=quiet) for c in cfgs]
    for p, a in zip(packed, alone):
        h_p, h_a = p["metrics"]["history"], a["metrics"]["history"]
        assert abs(h_p[0]["test_loss"] - h_a[0]["test_loss"]) < 1e-3
        assert abs(p["metrics"]["test_accuracy"] - a["metrics"]["test_accuracy"]) <= 0.1


# ---- result files ------------------------------------------------------------------------------


def test_results_are_separate_ordinary_files(tmp_path):
    cfgs = [
        TrainConfig(lr=lr, seed=s, iters=20, eval_every=10, device="cpu")
        for lr, s in ((0.1, 0), (0.01, 1), (0.05, 2))
    ]
    ids = ["run-a", "run-b", "run-c"]
    seen: list[Progress] = []
    recs = train_pack(
        cfgs,
        results_dir=tmp_path,
        run_ids=ids,
        progress=seen.append,
        extra=[{"sweep": "s", "task": i} for i in range(3)],
    )
    lone = train(
        TrainConfig(iters=20, eval_every=10, device="cpu"),
        results_dir=tmp_path / "lone",
        run_id="lone",
        progress=quiet,
    )
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [f"{i}.json" for i in ids]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [f"{i}.pt" for i in ids]
    for i, (cfg, rid) in enumerate(zip(cfgs, ids)):
        data = load_result(tmp_path / f"{rid}.json").data
        assert data == json.loads(json.dumps({k: v for k, v in recs[i].items() if k != "result_path"}))
        assert data["run_id"] == rid and data["status"] == "completed" and data["error"] is None
        assert TrainConfig.from_dict(data["config"]) == cfg
        assert data["packed_with"] == [r for r in ids if r != rid]
        assert data["sweep"] == "s" and data["task"] == i
        # the same shape as a lone run's record, in both directions (only the extras given differ)
        assert set(data) - set(lone) == {"sweep", "task"} and set(lone) - set(data) == {"result_path"}
        for key in ("metrics", "timings", "checkpointing", "env", "distributed"):
            assert set(data[key]) == set(lone[key]), key
        assert lone["packed_with"] == [] and lone["timings"]["pack_size"] == 1
        assert data["timings"]["pack_size"] == 3 and data["timings"]["train_s"] > 0
        assert [h["iteration"] for h in data["metrics"]["history"]] == [10, 20]
        assert set(data["metrics"]["history"][0]) == set(lone["metrics"]["history"][0])
        # its weights, loadable into the model it names
        model = build_model(data["config"]["model"])
        model.load_state_dict(torch.load(data["model_path"], weights_only=True))
        assert data["model_path"] == str(tmp_path / f"{rid}.pt")
        assert data["env"]["device"] == "cpu"
    assert not list(tmp_path.glob(".*.tmp"))
    assert [p.iteration for p in seen if p.test_accuracy is not None] == [10, 20]
    assert seen[-1].total == 20 and seen[-1].train_loss > 0


def test_failed_pack_writes_failed_records(tmp_path, data_copy):
    (data_copy / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"garbage")
    cfgs = [TrainConfig(lr=0.1, iters=5, device="cpu"), TrainConfig(lr=0.2, iters=5, device="cpu")]
    with pytest.raises(Exception, match="corrupt"):
        train_pack(cfgs, results_dir=tmp_path, run_ids=["x", "y"], data_dir=data_copy, progress=quiet)
    for rid, other, cfg in (("x", "y", cfgs[0]), ("y", "x", cfgs[1])):
        rec = json.loads((tmp_path / f"{rid}.json").read_text())
        assert rec["status"] == "failed" and rec["error"]["type"] == "DataError"
        assert "train-images-idx3-ubyte.gz" in rec["error"]["message"]
        assert rec["packed_with"] == [other] and rec["config"]["lr"] == cfg.lr
        assert rec["finished_at"] is not None and rec["metrics"]["history"] == []


def test_bad_packs_are_refused(tmp_path):
    mixed = [TrainConfig(iters=5, device="cpu"), TrainConfig(iters=5, batch_size=50, device="cpu")]
    with pytest.raises(PackError, match="batch_size"):
        train_pack(mixed, results_dir=tmp_path, run_ids=["a", "b"], progress=quiet)
    assert json.loads((tmp_path / "a.json").read_text())["error"]["type"] == "PackError"
    cfgs = [TrainConfig(iters=5, device="cpu")] * 2
    with pytest.raises(PackError, match="one run id per config"):
        train_pack(cfgs, results_dir=tmp_path / "n", run_ids=["a"])
    with pytest.raises(PackError, match="distinct"):
        train_pack(cfgs, results_dir=tmp_path / "n", run_ids=["a", "a"])
    assert not (tmp_path / "n").exists()


def test_a_pack_too_big_for_the_node_fails_each_run_naming_what_fits(tmp_path):
    """Sized where it trains: on the machine running it, a pack that does not fit ends before loading
    anything, with a failed record per run that names the largest pack that fits there."""
    cfg = TrainConfig(model="cnn", batch_size=30000, iters=1, device="cpu")  # ~5.7 GB a model
    fits = max_pack_that_fits(cfg, "cpu")
    if not 1 <= fits <= 6:
        pytest.skip(f"this machine fits {fits} of these models; the test wants a small number")
    cfgs = [dataclasses.replace(cfg, seed=s) for s in range(fits + 1)]
    ids = [f"big{i}" for i in range(len(cfgs))]
    with pytest.raises(PackError, match=f"use --pack {fits} or less"):
        train_pack(cfgs, run_ids=ids, results_dir=tmp_path)
    for rid in ids:
        rec = json.loads((tmp_path / f"{rid}.json").read_text())
        assert rec["status"] == "failed" and rec["error"]["type"] == "PackError"
        assert f"use --pack {fits} or less" in rec["error"]["message"]
    assert not list(tmp_path.glob("*.pt"))
