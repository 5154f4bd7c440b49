"""Learning-rate schedules (--schedule, --warmup) and input normalisation (--normalize) as ordinary
training options (issue 15, goal 5): the schedule is a pure function of (step, config) equal to torch's
own schedulers, applied to the lone step, DDP and packs alike, continued exactly by a resumed run; both
options go through train, sweep (comma lists), TOML, results, report and packs. Short runs only: the
99 % recipe itself is measured by benchmarks/bench_cnn99.py."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import signal

import pytest
import torch
from typer.main import get_command
from typer.testing import CliRunner

from mnist_jobs import data as mnist_data
from mnist_jobs.cli import app
from mnist_jobs.config import TRAIN_FIELDS, ConfigError, TrainConfig, parse_option
from mnist_jobs.packing import PackError, check_same_pack_keys, group_for_packing
from mnist_jobs.schedule import lr_scale, lr_scale_fn
from mnist_jobs.train import Interrupted, StopFlag, train, train_pack

runner = CliRunner(env={"COLUMNS": "200"})


def quiet(_p) -> None:
    pass


def torch_lrs(make, iters: int, lr: float = 1.0) -> list[float]:
    """The lr torch's scheduler gives each of `iters` optimizer steps."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(iters):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# ---- the schedule: a pure function of (step, config) -----------------------------------------------


@pytest.mark.parametrize(("iters", "warmup"), [(100, 0.3), (37, 0.25), (10, 0.0), (2, 0.3), (600, 0.1)])
def test_onecycle_is_torchs_onecycle(iters, warmup):
    cfg = TrainConfig(schedule="onecycle", warmup=warmup, iters=iters)
    ref = torch_lrs(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=1.0, total_steps=iters, pct_start=warmup, cycle_momentum=False
        ),
        iters,
    )
    assert [lr_scale(cfg, t) for t in range(iters)] == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_onecycle_defaults_and_edge_cases():
    cfg = TrainConfig(schedule="onecycle", iters=1000)
    assert cfg.warmup == 0.3  # OneCycleLR's pct_start
    assert cfg.config_id() == TrainConfig(schedule="onecycle", warmup=0.3, iters=1000).config_id()
    assert lr_scale(cfg, 0) == pytest.approx(1 / 25) and lr_scale(cfg, 299) == pytest.approx(1.0)
    assert lr_scale(cfg, 999) == pytest.approx(1 / 25 / 1e4)
    # warmup * iters == 1: torch divides by zero there, this does not
    assert lr_scale(TrainConfig(schedule="onecycle", warmup=0.01, iters=100), 0) == 1.0
    assert lr_scale(TrainConfig(schedule="onecycle", iters=1), 0) > 0


def test_cosine_is_torchs_cosine_annealing_after_a_linear_warmup():
    iters = 200
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=iters), iters)
    cfg = TrainConfig(schedule="cosine", iters=iters)
    assert [lr_scale(cfg, t) for t in range(iters)] == pytest.approx(ref, rel=1e-9, abs=1e-12)

    warm = TrainConfig(schedule="cosine", warmup=0.1, iters=iters)  # 20 warm-up steps
    scales = [lr_scale(warm, t) for t in range(iters)]
    assert scales[:20] == pytest.approx([(t + 1) / 20 for t in range(20)])
    after = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=iters - 20), iters - 20)
    assert scales[20:] == pytest.approx(after, rel=1e-9, abs=1e-12)
    assert all(a > b for a, b in itertools.pairwise(scales[20:])) and 0 < scales[-1] < 1e-3

    const = TrainConfig(warmup=0.05, iters=iters)  # constant after 10 warm-up steps
    assert [lr_scale(const, t) for t in range(12)] == pytest.approx(
        [0.1 * (t + 1) for t in range(10)] + [1, 1]
    )
    assert lr_scale_fn(const) is not None


def test_the_tutorial_preset_and_earlier_run_ids_are_untouched():
    d = TrainConfig()
    assert (d.schedule, d.warmup, d.normalize) == ("constant", 0.0, False)
    assert lr_scale_fn(d) is None  # nothing is applied: the optimizers keep their lr as before
    # run ids from before these options existed (computed with the previous commit) stay the same,
    # so earlier sweeps, results and checkpoints are still found
    assert d.config_id() == "900e155026"
    assert TrainConfig(model="cnn", lr=0.1, epochs=2).config_id() == "c3de133359"
    old_record = {k: v for k, v in d.to_dict().items() if k not in ("schedule", "warmup", "normalize")}
    assert TrainConfig.from_dict(old_record) == d
    assert TrainConfig(schedule="cosine").config_id() != d.config_id()
    assert TrainConfig(normalize=True).config_id() != d.config_id()
    assert TrainConfig(warmup=0.1).config_id() != d.config_id()
    assert TrainConfig(warmup=0).config_id() == d.config_id()  # an int 0 is 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "linear"}, "--schedule must be one of constant, cosine, onecycle (got 'linear')"),
        ({"warmup": 1.0}, "--warmup is a fraction of the iterations: >= 0 and < 1 (got 1.0)"),
        ({"warmup": -0.1}, "--warmup must be >= 0 (got -0.1)"),
        ({"warmup": math.nan}, "--warmup must be finite (got nan)"),
        ({"warmup": "0.1"}, "--warmup must be a number (got '0.1')"),
        ({"normalize": 1}, "--normalize must be on or off (got 1)"),
    ],
)
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kwargs)
    assert str(e.value) == message


def test_option_text():
    assert parse_option("normalize", "on,off") == [True, False]
    assert parse_option("normalize", " TRUE ") == [True] and parse_option("normalize", [False]) == [False]
    assert parse_option("schedule", "Cosine,onecycle") == ["cosine", "onecycle"]
    assert parse_option("warmup", "0.1,0.2") == [0.1, 0.2]
    with pytest.raises(ConfigError, match=r"--normalize must be on or off \(got 'maybe'\)"):
        parse_option("normalize", "on,maybe")


# ---- the engine applies it, in one place, to every kind of population ------------------------------


def test_every_step_trains_with_its_factor(monkeypatch, tmp_path):
    from mnist_jobs import steps

    seen: list[float] = []
    real = steps.Lone.set_lr_scale
    monkeypatch.setattr(steps.Lone, "set_lr_scale", lambda self, s: (seen.append(s), real(self, s)))
    cfg = TrainConfig(schedule="cosine", warmup=0.2, lr=0.1, iters=30, eval_every=30, device="cpu")
    train(cfg, results_dir=tmp_path, progress=quiet)
    assert seen == [lr_scale(cfg, t) for t in range(30)]
    seen.clear()
    train(TrainConfig(iters=30, eval_every=30, device="cpu"), results_dir=tmp_path, progress=quiet)
    assert seen == []  # constant: never touched


def test_lone_steps_take_the_factor():
    from mnist_jobs.device import SINGLE
    from mnist_jobs.steps import Lone

    ds = mnist_data.load(device="cpu")
    for cfg in (
        TrainConfig(lr=0.5, device="cpu"),  # plain SGD, fused into the update GEMM
        TrainConfig(lr=0.5, optimizer="adam", device="cpu"),  # optim.LoneOptimizer
        TrainConfig(model="cnn", lr=0.5, momentum=0.9, device="cpu"),  # autograd
    ):
        pop = Lone(cfg, ds, SINGLE, torch.device("cpu"))
        pop.set_lr_scale(0.25)
        lr = cfg.lr * pop.optimizer.opt.lr_scale if pop.optimizer else pop._step.sgd_lr
        assert lr == 0.125, cfg


def _cnn_with_torch_onecycle(cfg: TrainConfig, steps: int) -> dict[str, torch.Tensor]:
    """train()'s lone CNN run written out with torch.optim.SGD and torch's OneCycleLR."""
    from torch.nn import functional as F

    from mnist_jobs.models import build_model

    ds = mnist_data.load(device="cpu", normalize=cfg.normalize)
    torch.manual_seed(cfg.seed)
    model = build_model("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.iters, pct_start=cfg.warmup, cycle_momentum=False
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    for idx in torch.randperm(len(ds.train_y), generator=gen).split(cfg.batch_size)[:steps]:
        loss = F.cross_entropy(model(ds.train_x[idx]), ds.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_a_lone_cnn_run_is_torchs_onecycle_run(tmp_path, one_thread):
    cfg = TrainConfig(
        model="cnn", lr=0.1, momentum=0.9, schedule="onecycle", normalize=True, batch_size=32, iters=40,
        eval_every=40, device="cpu",
    )  # fmt: skip
    rec = train(cfg, results_dir=tmp_path, run_id="r", progress=quiet)
    mine = torch.load(rec["model_path"], weights_only=True)
    ref = _cnn_with_torch_onecycle(cfg, 40)
    for k in ref:  # the same maths; only the lr's last bits differ (lr * factor vs torch's formula)
        assert torch.allclose(mine[k], ref[k], rtol=1e-4, atol=1e-6), k
    # and the schedule matters at this tolerance: the constant-lr run is far from it
    const = train(
        TrainConfig(**{**cfg.to_dict(), "schedule": "constant", "warmup": 0.0}), results_dir=tmp_path
    )
    other = torch.load(const["model_path"], weights_only=True)
    assert not torch.allclose(other["fc2.weight"], ref["fc2.weight"], rtol=1e-4, atol=1e-6)


def _weights(rec) -> dict[str, torch.Tensor]:
    return torch.load(rec["model_path"], weights_only=True)


def _same_runs(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x["metrics"]["history"] == y["metrics"]["history"]
        wx, wy = _weights(x), _weights(y)
        assert wx.keys() == wy.keys() and all(torch.equal(wx[k], wy[k]) for k in wx)


LOGREG_PACK = [  # plain SGD (fused), momentum + weight decay (torch.optim arithmetic), two seeds
    {"lr": 0.1, "seed": 0},
    {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "seed": 1},
    {"lr": 0.2, "seed": 1},
]


@pytest.mark.parametrize(
    ("model", "common", "grid"),
    [
        ("logreg", {"schedule": "cosine", "warmup": 0.2, "iters": 120, "eval_every": 60}, LOGREG_PACK),
        ("logreg", {"optimizer": "adam", "schedule": "onecycle", "iters": 80, "eval_every": 40},
         [{"lr": 0.01}, {"lr": 0.003, "seed": 2}]),
        ("cnn", {"momentum": 0.5, "schedule": "onecycle", "normalize": True, "deskew": True, "batch_size": 32,
                 "iters": 30, "eval_every": 30}, [{"lr": 0.05}, {"lr": 0.1, "seed": 1}]),
    ],
)  # fmt: skip
def test_an_exact_pack_gives_each_model_its_lone_schedule_bit_for_bit(
    tmp_path, one_thread, model, common, grid
):
    cfgs = [TrainConfig(model=model, device="cpu", **common, **g) for g in grid]
    ids = [f"p{i}" for i in range(len(cfgs))]
    packed = train_pack(cfgs, results_dir=tmp_path / "pack", run_ids=ids, progress=quiet, exact=True)
    alone = [train(c, results_dir=tmp_path / "alone", progress=quiet) for c in cfgs]
    _same_runs(packed, alone)
    assert len({r["metrics"]["test_accuracy"] for r in packed}) > 1


def test_schedule_warmup_and_normalize_are_pack_keys():
    cfgs = [
        TrainConfig(lr=0.1),
        TrainConfig(lr=0.2),
        TrainConfig(lr=0.1, schedule="cosine"),
        TrainConfig(lr=0.1, schedule="cosine", warmup=0.1),
        TrainConfig(lr=0.1, normalize=True),
        TrainConfig(lr=0.1, deskew=True),
    ]
    assert group_for_packing(cfgs, 8) == [[0, 1], [2], [3], [4], [5]]
    for other in cfgs[2:]:
        with pytest.raises(PackError, match="runs in one pack must share"):
            check_same_pack_keys([cfgs[0], other])


# ---- a resumed run continues its schedule exactly ----------------------------------------------------


@pytest.mark.parametrize(
    ("configs", "stop_at"),
    [
        ([TrainConfig(model="cnn", optimizer="adam", lr=0.003, schedule="onecycle", normalize=True,
                      deskew=True, batch_size=32, iters=60, eval_every=20)], 13),  # in the rise
        ([TrainConfig(lr=0.2, momentum=0.9, schedule="cosine", warmup=0.1, iters=300, eval_every=70)], 150),
        ([TrainConfig(schedule="cosine", warmup=0.1, iters=300, eval_every=70, **g) for g in LOGREG_PACK], 20),
    ],
    ids=["cnn-onecycle-adam", "logreg-cosine-momentum", "logreg-pack-in-warmup"],
)  # fmt: skip
def test_a_run_stopped_mid_schedule_resumes_bit_for_bit(tmp_path, one_thread, configs, stop_at):
    configs = [TrainConfig(**{**c.to_dict(), "device": "cpu"}) for c in configs]
    ids = [f"r{i}" for i in range(len(configs))]
    straight = train_pack(configs, results_dir=tmp_path / "straight", run_ids=ids, progress=quiet)
    stop = StopFlag()

    def progress(p):
        if p.iteration >= stop_at:
            stop.request(signal.SIGTERM)

    out = tmp_path / "stopped"
    with pytest.raises(Interrupted) as err:
        train_pack(configs, results_dir=out, run_ids=ids, progress=progress, stop=stop, checkpoint_every=0)
    assert err.value.iteration < configs[0].iters and not (out / "r0.json").exists()
    resumed = train_pack(configs, results_dir=out, run_ids=ids, progress=quiet)
    assert resumed[0]["checkpointing"]["resumed_from_iteration"] == err.value.iteration
    _same_runs(resumed, straight)


# ---- normalisation ------------------------------------------------------------------------------------


def test_normalize_standardises_both_splits():
    plain, norm = mnist_data.load(device="cpu"), mnist_data.load(device="cpu", normalize=True)
    assert torch.equal(norm.train_x, (plain.train_x - 0.1307) / 0.3081)
    assert torch.equal(norm.test_x, (plain.test_x - 0.1307) / 0.3081)
    assert abs(norm.train_x.mean().item()) < 1e-3 and abs(norm.train_x.std().item() - 1) < 1e-3
    assert torch.equal(norm.train_y, plain.train_y)


# ---- an ordinary option: CLI, sweep lists, TOML, results, report -------------------------------------


def test_every_training_option_is_an_option_of_train_and_sweep():
    cmd = get_command(app)
    for name in ("train", "sweep"):
        params = {p.name for p in cmd.commands[name].params}
        assert set(TRAIN_FIELDS) <= params, (name, set(TRAIN_FIELDS) - params)


def test_train_sweep_toml_results_and_report(tmp_path):
    res = runner.invoke(
        app,
        ["train", "--schedule", "onecycle", "--normalize", "on", "--deskew", "on", "--iters", "4",
         "--eval-every", "2", "--device", "cpu", "--results-dir", str(tmp_path / "one")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "one").glob("*.json")]
    want = {"schedule": "onecycle", "warmup": 0.3, "normalize": True, "deskew": True}
    assert rec["config"] | want == rec["config"]

    toml = tmp_path / "sweep.toml"
    toml.write_text('schedule = ["constant", "cosine"]\nnormalize = [true, false]\nwarmup = 0.25\n')
    args = [
        "sweep",
        "--config",
        str(toml),
        "--lr",
        "0.1",
        "--seed",
        "0,1",
        "--iters",
        "8",
        "--eval-every",
        "4",
    ]
    args += ["--device", "cpu", "--pack", "8", "--executor", "debug", "--name", "s"]
    res = runner.invoke(app, [*args, "--results-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    results = [json.loads(p.read_text()) for p in (tmp_path / "s").glob("logreg-*.json")]
    seen = {(r["config"]["schedule"], r["config"]["normalize"], r["config"]["seed"]) for r in results}
    assert len(results) == 8 and len(seen) == 8
    assert {r["config"]["warmup"] for r in results} == {0.25}
    assert {len(r["packed_with"]) for r in results} == {1}  # packs of 2: schedule and normalize split them

    # the CLI overrides the file's list, as for any option
    res = runner.invoke(app, [*args, "--schedule", "cosine", "--dry-run", "--results-dir", str(tmp_path)])
    assert res.exit_code == 0 and "4 run(s)" in res.output, res.output
    res = runner.invoke(app, [*args, "--deskew", "on,off", "--dry-run", "--results-dir", str(tmp_path)])
    assert res.exit_code == 0 and "16 run(s)" in res.output and "deskew" in res.output, res.output

    table = runner.invoke(app, ["report", str(tmp_path / "s")])
    assert table.exit_code == 0, table.output
    assert "schedule" in table.output and "normalize" in table.output and "cosine" in table.output
    rows = list(
        csv.DictReader(
            io.StringIO(runner.invoke(app, ["report", str(tmp_path / "s"), "--format", "csv"]).stdout)
        )
    )
    assert len(rows) == 4 and {(r["schedule"], r["normalize"]) for r in rows} == {
        ("constant", "True"), ("constant", "False"), ("cosine", "True"), ("cosine", "False")
    }  # fmt: skip
    only = runner.invoke(app, ["report", str(tmp_path / "s"), "--filter", "normalize=on", "--format", "csv"])
    assert only.exit_code == 0 and len(list(csv.DictReader(io.StringIO(only.stdout)))) == 2, only.output
