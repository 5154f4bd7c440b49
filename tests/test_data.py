import gzip
import os

import pytest
import torch

from mnist_jobs import data


def test_shipped_files_verify_and_load_like_to_tensor():
    ds = data.load()
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    # Same values as torchvision's ToTensor on the same image.
    from torchvision import datasets, transforms

    ref = datasets.MNIST(str(data.prepare()), train=False, transform=transforms.ToTensor())
    img, label = ref[123]
    assert torch.equal(img, ds.test_x[123]) and label == ds.test_y[123].item()
    assert torch.bincount(ds.train_y).tolist()[:2] == [5923, 6742]  # the well-known class counts


def test_corrupt_file_is_named(data_copy):
    victim = data_copy / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    blob = bytearray(victim.read_bytes())
    blob[100] ^= 0xFF
    victim.write_bytes(bytes(blob))
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz is corrupt"):
        data.load(data_copy)


def test_truncated_file_is_named(data_copy):
    victim = data_copy / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz is corrupt or truncated"):
        data.prepare(data_copy)


def test_missing_file_is_named(data_copy):
    (data_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="missing .*t10k-labels-idx1-ubyte.gz"):
        data.prepare(data_copy)


def test_no_data_and_no_network_says_what_to_do(tmp_path):
    with pytest.raises(data.DataError, match="download failed|--data-dir"):
        data.prepare(tmp_path / "empty")


def test_extraction_is_verified_and_reused(data_copy):
    root = data.prepare(data_copy)
    out = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    with gzip.open(data_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz") as f:
        assert out.read_bytes() == f.read()
    mtime = out.stat().st_mtime_ns
    data.prepare(data_copy)
    assert out.stat().st_mtime_ns == mtime  # not extracted twice


def test_epoch_batches_cover_everything_once():
    g = torch.Generator().manual_seed(0)
    batches = data.epoch_batches(1050, 100, g, torch.device("cpu"))
    assert [len(b) for b in batches] == [100] * 10 + [50]
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(1050))


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_gunzipped_copies_are_readable_by_the_group(data_copy, umask):
    """The copies get the mode any new file gets (0666 less the umask), not mkstemp's 0600: a
    teammate's job sharing the folder must be able to read them."""
    old = os.umask(umask)
    try:
        root = data.prepare(data_copy)
    finally:
        os.umask(old)
    for name in data.RAW_SIZES:
        assert oct((root / "MNIST" / "raw" / name).stat().st_mode & 0o777) == oct(0o666 & ~umask), name


def test_private_copies_of_an_older_version_are_opened_up(data_copy):
    root = data.prepare(data_copy)
    raw = root / "MNIST" / "raw"
    for name in data.RAW_SIZES:
        (raw / name).chmod(0o600)  # what an older mnist-jobs left
    mtimes = {name: (raw / name).stat().st_mtime_ns for name in data.RAW_SIZES}
    old = os.umask(0o022)
    try:
        data.prepare(data_copy)
    finally:
        os.umask(old)
    for name in data.RAW_SIZES:
        assert (raw / name).stat().st_mode & 0o777 == 0o644, name
        assert (raw / name).stat().st_mtime_ns == mtimes[name]  # fixed in place, not extracted again
