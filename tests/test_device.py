import pytest
import torch

from mnist_jobs.device import DeviceError, select_device


def test_auto_picks_what_exists():
    dev = select_device("auto")
    if torch.cuda.is_available():
        assert dev.type == "cuda"
    elif torch.backends.mps.is_available():
        assert dev.type == "mps"
    else:
        assert dev == torch.device("cpu")


def test_cpu():
    assert select_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_missing_cuda_is_an_error_not_a_fallback(spec):
    with pytest.raises(DeviceError, match=f"--device {spec} requested but CUDA is not available"):
        select_device(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_out_of_range():
    with pytest.raises(DeviceError, match="CUDA device"):
        select_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_missing_mps_is_an_error():
    with pytest.raises(DeviceError, match="MPS is not available"):
        select_device("mps")
