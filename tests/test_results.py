import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mnist_jobs.report import load_runs
from mnist_jobs.results import ResultError, atomic_write_json, parse_result


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2, "b": [1, 2, 3]})
    assert json.loads(p.read_text()) == {"a": 2, "b": [1, 2, 3]}
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_failed_serialisation_keeps_old_file(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": True}
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_killed_writer_never_leaves_a_partial_file(tmp_path):
    """SIGKILL a process that rewrites a big result in a loop; the file always parses."""
    target = tmp_path / "r.json"
    code = textwrap.dedent(f"""
        from mnist_jobs.results import atomic_write_json
        i = 0
        while True:
            atomic_write_json({str(target)!r}, {{"i": i, "blob": list(range(200000))}})
            i += 1
    """)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", code])
        try:
            for _ in range(200):  # wait for at least one complete write
                if target.exists():
                    break
                import time

                time.sleep(0.05)
            import time

            time.sleep(0.3)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        data = json.loads(target.read_text())  # never partial
        assert len(data["blob"]) == 200000


def test_loader_skips_foreign_truncated_and_future_files(tmp_path):
    good = {
        "schema_version": 1,
        "kind": "mnist-jobs/result",
        "run_id": "x",
        "status": "completed",
        "config": {},
        "metrics": {},
    }
    atomic_write_json(tmp_path / "good.json", good)
    (tmp_path / "trunc.json").write_text(json.dumps(good)[:20])
    (tmp_path / "foreign.json").write_text('{"hello": "world"}')
    atomic_write_json(tmp_path / "future.json", {**good, "schema_version": 99})
    ok, bad = load_runs(tmp_path)  # what `report` reads
    assert [r["run_id"] for r in ok] == ["x"]
    assert sorted(Path(p).name for p, _ in bad) == ["foreign.json", "future.json", "trunc.json"]
    with pytest.raises(ResultError, match="newer"):
        parse_result(json.dumps({**good, "schema_version": 99}))


# ---- file modes: what a teammate sharing the folder can read -----------------------------------


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_written_files_get_the_mode_of_any_new_file(tmp_path, umask):
    """Results, manifests, weights and checkpoints are 0666 less the umask (not mkstemp's 0600)."""
    from mnist_jobs.results import atomic_write_bytes, current_umask, default_file_mode

    expected = 0o666 & ~umask
    assert current_umask() == umask and default_file_mode() == expected
    atomic_write_json(tmp_path / "run.json", {"kind": "mnist-jobs/result", "status": "completed"})
    atomic_write_json(tmp_path / "sweep" / "sweep.json", {"kind": "mnist-jobs/sweep", "runs": {}})
    atomic_write_bytes(tmp_path / "run.pt", b"\x80weights")
    atomic_write_json(tmp_path / "run.json", {"rewritten": True})  # a rewrite too
    for name in ("run.json", "sweep/sweep.json", "run.pt"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(expected), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.pt", "sweep"]  # no temp left


def test_a_real_run_writes_readable_result_and_weights(tmp_path, umask):
    from mnist_jobs.config import TrainConfig
    from mnist_jobs.train import train

    r = train(TrainConfig(iters=10, eval_every=10, device="cpu"), results_dir=tmp_path, run_id="r")
    for path in (r["result_path"], r["model_path"]):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


# ---- strict JSON and divergence ----------------------------------------------------------------


def strict_loads(text: str):
    """json.loads as jq or JavaScript would parse: NaN, Infinity and -Infinity are errors."""

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_strict_non_finite_floats_become_null(tmp_path):
    p = tmp_path / "r.json"
    nan, inf = float("nan"), float("inf")
    atomic_write_json(p, {"a": nan, "b": [inf, -inf, 1.5, (nan, 2)], "c": {"d": nan, "e": "nan"}, "f": 0.25})
    assert strict_loads(p.read_text()) == {
        "a": None,
        "b": [None, None, 1.5, [None, 2]],
        "c": {"d": None, "e": "nan"},
        "f": 0.25,
    }
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular"):  # other errors are still errors
        atomic_write_json(p, loop)
    assert strict_loads(p.read_text())["f"] == 0.25  # and leave the old file


DIVERGING = {"lr": 100.0, "weight_decay": 1.0}  # lr * weight decay > 2: the weights grow 99x a step


def test_a_diverged_lone_run_is_a_failed_record_in_strict_json(tmp_path):
    """(Plain-SGD logreg cannot diverge: its gradient is bounded, so even lr 1000 keeps finite losses.)"""
    from mnist_jobs.config import TrainConfig
    from mnist_jobs.train import Diverged, train

    cfg = TrainConfig(iters=300, eval_every=50, device="cpu", **DIVERGING)
    with pytest.raises(Diverged, match=r"train loss became NaN at iteration 50 \(lr 100, weight decay 1\)"):
        train(cfg, results_dir=tmp_path, run_id="boom", progress=lambda p: None)
    rec = strict_loads((tmp_path / "boom.json").read_text())
    assert rec["status"] == "failed"
    assert rec["error"] == {
        "type": "Diverged",
        "message": "train loss became NaN at iteration 50 (lr 100, weight decay 1); lower --lr",
        "traceback": None,
    }
    m = rec["metrics"]
    assert m["diverged_at_iteration"] == 50 and m["iterations"] == 50  # stopped at the first evaluation
    assert m["test_accuracy"] is None and m["test_loss"] is None and m["final_train_loss"] is None
    assert [(h["iteration"], h["train_loss"], h["test_loss"]) for h in m["history"]] == [(50, None, None)]
    assert rec["model_path"] is None and not (tmp_path / "boom.pt").exists()
    assert rec["finished_at"] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boom.json", "tb"]  # no checkpoint, no temp


def test_a_pack_marks_only_its_diverged_model(tmp_path):
    from mnist_jobs.config import TrainConfig
    from mnist_jobs.train import train, train_pack

    good = TrainConfig(lr=0.1, iters=200, eval_every=100, device="cpu")
    bad = TrainConfig(iters=200, eval_every=100, device="cpu", **DIVERGING)
    records = train_pack([good, bad], results_dir=tmp_path, run_ids=["good", "bad"], progress=lambda p: None)
    on_disk = {r["run_id"]: strict_loads(Path(r["result_path"]).read_text()) for r in records}
    assert {rid: d["status"] for rid, d in on_disk.items()} == {"good": "completed", "bad": "failed"}
    assert on_disk["good"]["error"] is None and (tmp_path / "good.pt").exists()
    assert on_disk["bad"]["error"]["type"] == "Diverged" and not (tmp_path / "bad.pt").exists()
    assert on_disk["bad"]["metrics"]["diverged_at_iteration"] == 100
    assert [h["train_loss"] for h in on_disk["bad"]["metrics"]["history"]] == [None, None]
    assert on_disk["bad"]["metrics"]["iterations"] == 200  # the pack trained on for its other model
    # the diverged model did not disturb the other: it trains as its lone run does
    lone = train(good, results_dir=tmp_path / "lone", progress=lambda p: None)
    assert on_disk["good"]["metrics"]["test_accuracy"] == pytest.approx(
        lone["metrics"]["test_accuracy"], abs=0.1
    )
    assert on_disk["good"]["metrics"]["test_accuracy"] > 80


def test_a_diverged_run_resumed_after_its_divergence_keeps_its_error_word_for_word(tmp_path):
    """A pack stopped (and checkpointed) after one of its models diverged, then resumed: that model's
    failed record says what the uninterrupted run's says, not a vaguer sentence."""
    from mnist_jobs.config import TrainConfig
    from mnist_jobs.train import Interrupted, StopFlag, train_pack

    good = TrainConfig(lr=0.1, iters=300, eval_every=100, device="cpu")
    bad = TrainConfig(iters=300, eval_every=100, device="cpu", **DIVERGING)
    ids = ["good", "bad"]
    straight = train_pack([good, bad], results_dir=tmp_path / "a", run_ids=ids, progress=lambda p: None)
    stop = StopFlag()

    def stop_after_the_divergence(p) -> None:
        if p.iteration >= 150:
            stop.request()

    with pytest.raises(Interrupted):
        train_pack([good, bad], results_dir=tmp_path / "b", run_ids=ids, stop=stop,
                   progress=stop_after_the_divergence)  # fmt: skip
    resumed = train_pack([good, bad], results_dir=tmp_path / "b", run_ids=ids, progress=lambda p: None)
    assert resumed[1]["checkpointing"]["resumes"] == 1
    assert resumed[1]["error"]["message"] == straight[1]["error"]["message"], resumed[1]["error"]
    assert "train loss became" in resumed[1]["error"]["message"]
