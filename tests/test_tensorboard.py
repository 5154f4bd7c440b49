"""TensorBoard logs (tblog.py), read back with tensorboard's own readers: every step exactly once for a
run stopped and resumed, or killed after a checkpoint and resumed; one folder per run of a pack; DDP's
rank 0 only; the HParams dashboard of a real `tensorboard` server compares a sweep; without the package
runs work and one warning says what to install; nothing imports tensorboard before a run trains."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from mnist_jobs import tblog
from mnist_jobs.config import TrainConfig
from mnist_jobs.device import DistInfo
from mnist_jobs.local import free_port
from mnist_jobs.train import Interrupted, StopFlag, train, train_pack

pytest.importorskip("tensorboard", reason="the tensorboard extra (installed by dev)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

REPO = Path(__file__).resolve().parent.parent
CFG = TrainConfig(lr=0.1, momentum=0.5, iters=60, eval_every=10, device="cpu")
STEPS = [10, 20, 30, 40, 50, 60]
TAGS = ("train/loss", "test/loss", "test/accuracy")
HISTORY_KEY = {"train/loss": "train_loss", "test/loss": "test_loss", "test/accuracy": "test_accuracy"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(
            CFG, results_dir=tmp_path_factory.mktemp("straight"), run_id="r", progress=lambda p: None
        )
    finally:
        torch.set_num_threads(before)


def scalars(folder: Path | str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag, as TensorBoard's EventAccumulator reads the folder (all its files)."""
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def raw_points(folder: Path) -> list[tuple[int, str]]:
    """Every (step, tag) of every event in every file, as the files hold them: duplicates included."""
    out = []
    for f in sorted(folder.glob("*tfevents*")):
        for event in EventFileLoader(str(f)).Load():
            out += [(event.step, v.tag) for v in event.summary.value]
    return out


def sessions(folder: Path) -> list[dict]:
    """The HParams session starts in the folder: {hparam: value}."""
    found = []
    for f in sorted(folder.glob("*tfevents*")):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    start = data.session_start_info
                    found.append({k: getattr(x, x.WhichOneof("kind")) for k, x in start.hparams.items()})
    return found


def assert_logged_once(folder: Path, record: dict, steps: list[int] = STEPS) -> None:
    """One point per tag and step, the record's history values (float32), one HParams session."""
    got = scalars(folder)
    assert sorted(got) == sorted(TAGS)
    for tag in TAGS:
        assert [s for s, _ in got[tag]] == steps, tag
        want = [h[HISTORY_KEY[tag]] for h in record["metrics"]["history"]]
        assert [v for _, v in got[tag]] == pytest.approx(want, rel=1e-6), tag
    points = [p for p in raw_points(folder) if not p[1].startswith("_hparams_")]
    assert sorted(points) == sorted((s, t) for s in steps for t in TAGS)  # no duplicate in any file
    [hp] = sessions(folder)
    assert hp["lr"] == record["config"]["lr"] and hp["model"] == record["config"]["model"]
    assert hp["batch_size"] == record["config"]["batch_size"] and hp["seed"] == record["config"]["seed"]


def test_a_run_logs_its_history_and_hparams_beside_its_result(tmp_path, straight):
    folder = Path(straight["tensorboard"])
    assert folder == Path(straight["result_path"]).parent / "tb" / "r"
    assert_logged_once(folder, straight)
    assert len(list(folder.glob("*tfevents*"))) == 1


def test_stopped_and_resumed_run_logs_each_step_once(tmp_path, straight, one_thread):
    """Stopped by its StopFlag at iteration 25 (between evaluations), resumed: the curves carry on at
    30, as the uninterrupted run's, with no point restarted or repeated."""
    stop = StopFlag()

    def progress(p):
        if p.iteration >= 25:
            stop.request(signal.SIGUSR2)

    with pytest.raises(Interrupted) as err:
        train(CFG, results_dir=tmp_path, run_id="r", stop=stop, progress=progress)
    assert err.value.iteration == 25
    folder = tmp_path / "tb" / "r"
    assert [s for s, _ in scalars(folder)["test/accuracy"]] == [10, 20]
    rec = train(CFG, results_dir=tmp_path, run_id="r", progress=lambda p: None)
    assert rec["checkpointing"]["resumed_from_iteration"] == 25 and rec["tensorboard"] == str(folder)
    assert_logged_once(folder, rec)
    assert scalars(folder) == scalars(straight["tensorboard"])  # the same curves, bit for bit
    assert len(list(folder.glob("*tfevents*"))) == 2  # a file per attempt


KILLED = """
import json, os, signal, sys, torch
torch.set_num_threads(1)
from mnist_jobs.config import TrainConfig
from mnist_jobs.train import train
def progress(p):
    if p.iteration == 30 and p.test_accuracy is not None:  # after its point 30 is written
        os.kill(os.getpid(), signal.SIGKILL)
cfg = TrainConfig.from_dict(json.loads(sys.argv[2]))
train(cfg, results_dir=sys.argv[1], run_id="r", checkpoint_every=20, progress=progress)
"""


def test_run_killed_after_a_checkpoint_logs_each_step_once_when_resumed(tmp_path, straight, one_thread):
    """SIGKILL at iteration 30, after the checkpoint of 20: its file holds 10, 20 and 30. The resume
    (from 20) cuts 30 out of that file and logs 30..60 itself."""
    p = subprocess.run(
        [sys.executable, "-c", KILLED, str(tmp_path), json.dumps(CFG.to_dict())],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    folder = tmp_path / "tb" / "r"
    [first] = folder.glob("*tfevents*")
    assert [s for s, _ in scalars(folder)["test/loss"]] == [10, 20, 30]
    with first.open("ab") as f:  # and a torn record at its end, as a kill in mid-write leaves
        f.write(tblog.frame(b"x" * 40)[:25])

    rec = train(CFG, results_dir=tmp_path, run_id="r", progress=lambda p: None)
    assert rec["checkpointing"]["resumed_from_iteration"] == 20
    assert_logged_once(folder, rec)
    assert scalars(folder) == scalars(straight["tensorboard"])
    assert [e.step for e in EventFileLoader(str(first)).Load() if e.summary.value] == [0, 10, 20]


def test_points_the_earlier_attempt_did_not_log_are_written_on_resume(tmp_path, straight, one_thread):
    """An attempt without tensorboard (off, or not installed on that node), resumed with it: the
    restored history goes in first, so the curve is whole."""
    stop = StopFlag()
    with pytest.raises(Interrupted):
        train(
            CFG,
            results_dir=tmp_path,
            run_id="r",
            stop=stop,
            tensorboard=False,
            progress=lambda p: p.iteration >= 40 and stop.request(),
        )
    assert not (tmp_path / "tb").exists()
    rec = train(CFG, results_dir=tmp_path, run_id="r", progress=lambda p: None)
    assert rec["checkpointing"]["resumed_from_iteration"] == 40
    assert_logged_once(tmp_path / "tb" / "r", rec)


def test_a_rerun_from_scratch_replaces_the_old_curves(tmp_path):
    cfg = TrainConfig(lr=0.1, iters=20, eval_every=10, device="cpu")
    train(cfg, results_dir=tmp_path, run_id="r", progress=lambda p: None)
    rec = train(cfg, results_dir=tmp_path, run_id="r", progress=lambda p: None)  # (as sweep --force)
    assert_logged_once(tmp_path / "tb" / "r", rec, [10, 20])


def test_a_pack_logs_one_folder_per_run(tmp_path):
    cfgs = [
        TrainConfig(lr=lr, seed=s, iters=30, eval_every=10, device="cpu") for lr, s in ((0.01, 0), (0.1, 1))
    ]
    recs = train_pack(cfgs, results_dir=tmp_path / "lr-study", run_ids=["lo", "hi"], progress=lambda p: None)
    assert sorted(p.name for p in (tmp_path / "lr-study" / "tb").iterdir()) == ["hi", "lo"]
    for rec in recs:
        assert rec["tensorboard"] == str(tmp_path / "lr-study" / "tb" / rec["run_id"])
        assert_logged_once(Path(rec["tensorboard"]), rec, [10, 20, 30])
    assert scalars(recs[0]["tensorboard"]) != scalars(recs[1]["tensorboard"])
    on_disk = json.loads(Path(recs[0]["result_path"]).read_text())
    assert on_disk["tensorboard"] == recs[0]["tensorboard"]


DDP = TrainConfig(lr=0.05, batch_size=64, iters=30, eval_every=10, device="cpu")


def _ddp_rank(rank: int, port: int, results: str) -> None:
    torch.set_num_threads(1)
    dist = DistInfo(rank=rank, local_rank=rank, world_size=2, local_world_size=2, master_port=port)
    try:
        rec = train(DDP, results_dir=results, run_id="d", dist=dist, progress=lambda p: None)
        Path(results, f"rank{rank}.tb").write_text(str(rec["tensorboard"]))
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def test_ddp_rank_0_alone_logs(tmp_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    folder = tmp_path / "tb" / "d"
    assert (tmp_path / "rank0.tb").read_text() == str(folder) and (
        tmp_path / "rank1.tb"
    ).read_text() == "None"
    assert len(list(folder.glob("*tfevents*"))) == 1
    assert_logged_once(folder, json.loads((tmp_path / "d.json").read_text()), [10, 20, 30])


def _get(port: int, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_tensorboard_server_shows_a_resumed_pack_and_compares_it_in_the_hparams_view(tmp_path):
    """A real `tensorboard --logdir <sweep>/tb` (its default loader, the Rust data server where there
    is one): a pack stopped at iteration 10 and resumed has each run's curve once, 10, 20, 30 across
    its two files, and both runs are sessions of the HParams dashboard with their lr and accuracy."""
    sweep = tmp_path / "lr-study"
    cfgs = [TrainConfig(lr=lr, iters=30, eval_every=10, device="cpu") for lr in (0.01, 0.1)]
    stop = StopFlag()
    with pytest.raises(Interrupted):
        train_pack(
            cfgs, results_dir=sweep, run_ids=["lo", "hi"], stop=stop, progress=lambda p: stop.request()
        )
    recs = train_pack(cfgs, results_dir=sweep, run_ids=["lo", "hi"], progress=lambda p: None)
    assert recs[0]["checkpointing"]["resumed_from_iteration"] == 10
    exe = Path(sys.executable).with_name("tensorboard")
    port = free_port()
    server = subprocess.Popen(
        [str(exe), "--logdir", str(sweep / "tb"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    query = {"startIndex": 0, "sliceSize": 10, "colParams": [], "allowedStatuses": ["STATUS_UNKNOWN"]}
    groups: list = []
    curves: dict[str, list] = {}
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                groups = _get(port, "/data/plugin/hparams/session_groups", query)["sessionGroups"]
                for run in ("lo", "hi"):
                    curves[run] = _get(port, f"/data/plugin/scalars/scalars?run={run}&tag=test%2Faccuracy")
            except OSError:
                pass
            if len(groups) == 2 and all(c and c[-1][1] == 30 for c in curves.values()) and len(curves) == 2:
                break
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
    by_name = {g["name"]: g for g in groups}
    assert sorted(by_name) == ["hi", "lo"], groups
    for rec in recs:
        curve = curves[rec["run_id"]]  # [wall time, step, value] per point
        assert [step for _, step, _ in curve] == [10, 20, 30]
        want = [h["test_accuracy"] for h in rec["metrics"]["history"]]
        assert [v for _, _, v in curve] == pytest.approx(want, rel=1e-6)
        g = by_name[rec["run_id"]]
        assert g["hparams"]["lr"] == rec["config"]["lr"] and g["hparams"]["model"] == "logreg"
        acc = {m["name"]["tag"]: m for m in g["metricValues"]}["test/accuracy"]
        assert acc["trainingStep"] == 30
        assert acc["value"] == pytest.approx(rec["metrics"]["test_accuracy"], rel=1e-6)


def test_without_tensorboard_runs_work_and_one_line_says_what_to_install(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith("tensorboard.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard → ImportError
    monkeypatch.setattr(tblog, "_warned", set())
    cfg = TrainConfig(iters=10, eval_every=10, device="cpu")
    a = train(cfg, results_dir=tmp_path, run_id="a", progress=lambda p: None)
    b = train(cfg, results_dir=tmp_path, run_id="b", progress=lambda p: None)
    assert a["status"] == b["status"] == "completed" and a["tensorboard"] is None is b["tensorboard"]
    assert not (tmp_path / "tb").exists()
    err = [ln for ln in capsys.readouterr().err.splitlines() if "TensorBoard" in ln]
    assert err == [
        "Warning: no TensorBoard logs: the tensorboard package is not installed; "
        "pip install 'mnist-jobs[tensorboard]'"
    ]


def test_turned_off_it_writes_nothing_and_says_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(tblog.ENV, "0")
    rec = train(TrainConfig(iters=10, eval_every=10, device="cpu"), results_dir=tmp_path, run_id="a")
    assert rec["tensorboard"] is None and not (tmp_path / "tb").exists()
    assert "TensorBoard" not in capsys.readouterr().err
    assert tblog.wanted(None) is False and tblog.wanted(True) is True
    monkeypatch.setenv(tblog.ENV, "1")
    assert tblog.wanted(None) is True


def test_nothing_imports_tensorboard_until_a_run_trains():
    code = textwrap.dedent(
        """
        import sys
        import mnist_jobs.train, mnist_jobs.job, mnist_jobs.cli
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'google')))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mnist_jobs", "train", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0 and "tensorboard" not in p.stderr and "tblog" not in p.stderr


def test_record_framing_is_tfrecord():
    assert tblog.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tblog.crc32c(b"") == 0
    blob = tblog.frame(b"abc") + tblog.frame(b"") + tblog.frame(b"de")[:-1]
    assert [d for _, _, d in tblog.records(blob)] == [b"abc", b""]  # the torn third is not a record
