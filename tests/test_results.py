import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mnist_jobs.results import ResultError, atomic_write_json, load_results, parse_result


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
    ok, bad = load_results(tmp_path)
    assert [r.run_id for r in ok] == ["x"]
    assert sorted(p.name for p, _ in bad) == ["foreign.json", "future.json", "trunc.json"]
    with pytest.raises(ResultError, match="newer"):
        parse_result(json.dumps({**good, "schema_version": 99}))
