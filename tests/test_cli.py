import json
import subprocess
import sys

import pytest
from conftest import terminal_job
from typer.testing import CliRunner

from mnist_jobs.cli import app

runner = CliRunner()


def test_help_does_not_import_torch():
    code = (
        "import sys; from mnist_jobs.cli import app; assert 'torch' not in sys.modules; "
        "assert 'submitit' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "mnist_jobs", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout


def test_train_end_to_end(tmp_path):
    res = runner.invoke(
        app,
        ["train", "--iters", "20", "--eval-every", "10", "--device", "cpu", "--results-dir", str(tmp_path)],
    )
    assert res.exit_code == 0, res.output
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert f"test accuracy {data['metrics']['test_accuracy']:.2f}%" in res.output
    assert str(files[0]) in res.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lr", "abc"], "--lr must be a number (got 'abc')"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--iters", "1.5"], "--iters must be an integer"),
        (["--model", "vgg"], "--model must be one of logreg, cnn"),
        (["--optimizer", "rmsprop"], "--optimizer must be one of sgd, adam"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
        (["--epochs", "2", "--iters", "5"], "not both"),
        (["--lr", "0.1,0.2"], "use `mnist-jobs sweep`"),
        (["--nope"], "No such option: --nope"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, needle):
    res = runner.invoke(app, ["train", *args, "--results-dir", str(tmp_path / "out")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("Error: ") and needle in lines[0], res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_unwritable_results_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = runner.invoke(app, ["train", "--iters", "5", "--results-dir", str(blocker / "sub")])
    assert res.exit_code == 2 and "not writable" in res.output and "Traceback" not in res.output


def test_corrupt_data_is_exit_2_and_no_record(tmp_path, data_copy):
    (data_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    res = runner.invoke(
        app, ["train", "--iters", "5", "--data-dir", str(data_copy), "--results-dir", str(tmp_path / "out")]
    )
    assert res.exit_code == 2 and "t10k-labels-idx1-ubyte.gz is corrupt" in res.output
    assert not list((tmp_path / "out").glob("*.json"))


def test_missing_cuda_is_exit_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    res = runner.invoke(app, ["train", "--device", "cuda", "--results-dir", str(tmp_path)])
    assert res.exit_code == 2 and "CUDA is not available" in res.output


def test_ctrl_c_in_a_foreground_train_checkpoints_and_the_same_command_resumes_it(tmp_path):
    """Ctrl-C in `mnist-jobs train` (SIGINT to its process group): the run checkpoints where it is,
    exits 130 with one line (no traceback, no record), and the same command again resumes it under
    the same run id, to the history of an uninterrupted run (bit for bit, CPU, same threads)."""
    import os
    import signal
    import time

    import torch

    from mnist_jobs.config import TrainConfig
    from mnist_jobs.train import train

    args = ["--iters", "12000", "--eval-every", "6000", "--lr", "0.05", "--device", "cpu"]
    cmd = [sys.executable, "-m", "mnist_jobs", "train", *args, "--results-dir", str(tmp_path)]
    env = {**{k: v for k, v in os.environ.items() if k != "MNIST_JOBS_TENSORBOARD"}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=terminal_job, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "tb").exists():  # its TensorBoard folder: the loop has started
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (out, err)
    errors = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: interrupted at iteration "), err
    assert "the same command again resumes it" in errors[0] and "Traceback" not in err + out
    assert not list(tmp_path.glob("*.json"))
    [ck] = tmp_path.glob("*.ckpt.pt")
    run_id = ck.name.removesuffix(".ckpt.pt")

    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming {run_id} from {ck}" in done.stdout
    [rec] = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert rec["run_id"] == run_id and rec["checkpointing"]["resumed_from_iteration"] > 0
    assert not ck.exists()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train(
            TrainConfig(iters=12000, eval_every=6000, lr=0.05, device="cpu"), results_dir=tmp_path / "ref"
        )
    finally:
        torch.set_num_threads(before)
    assert rec["metrics"]["history"] == ref["metrics"]["history"]
