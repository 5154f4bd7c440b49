import gzip
import os
from pathlib import Path

import pytest
import torch

from mnist_jobs import data

data_writable = data._writable_dir


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


# ---- the decoded cache: torchvision decodes on first use only ---------------------------------------

_LOAD_IN_SUBPROCESS = """
import sys
from mnist_jobs import data
arrays = data.load_uint8(sys.argv[1])
print("torchvision" in sys.modules, [tuple(a.shape) for a in arrays])
"""


def _reference(data_dir):
    """What torchvision decodes from these files, without the cache."""
    return data._decode(data.prepare(data_dir))


def _assert_identical(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _cache_file(data_dir):
    key = data.source_key(data.verify_gz(data_dir / "MNIST" / "raw"))
    return data_dir / "MNIST" / "raw" / data.cache_name(key)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """XDG_CACHE_HOME in tmp_path: no test reads or writes the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "mnist_jobs" / "data" / "MNIST" / "raw"


def test_decoded_cache_is_made_once_then_loaded_without_torchvision(data_copy, private_cache):
    import subprocess
    import sys

    cache = _cache_file(data_copy)
    assert not cache.exists()
    run = [sys.executable, "-c", _LOAD_IN_SUBPROCESS, str(data_copy)]
    first = subprocess.run(run, capture_output=True, text=True, check=True, env=os.environ)
    assert first.stdout.startswith("True")  # first use: torchvision decodes
    assert cache.stat().st_size == data.CACHE_HEADER_SIZE + data.CACHE_PAYLOAD_SIZE
    mtime = cache.stat().st_mtime_ns
    second = subprocess.run(run, capture_output=True, text=True, check=True, env=os.environ)
    assert second.stdout.startswith("False"), second.stdout  # from the cache: no torchvision at all
    assert "(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)" in second.stdout
    assert cache.stat().st_mtime_ns == mtime  # read, not rewritten
    _assert_identical(data.load_uint8(data_copy), _reference(data_copy))  # bit-identical
    assert oct(cache.stat().st_mode & 0o777) == oct(data.default_file_mode())
    assert not list(cache.parent.glob(".*.tmp"))


def _count_decodes(monkeypatch):
    calls = []
    real = data._decode

    def counting(root):
        calls.append(root)
        return real(root)

    monkeypatch.setattr(data, "_decode", counting)
    return calls


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated", "flipped-header"])
def test_corrupt_or_truncated_cache_is_detected_and_rebuilt(data_copy, private_cache, monkeypatch, damage):
    data.load_uint8(data_copy)
    cache = _cache_file(data_copy)
    good = cache.read_bytes()
    blob = bytearray(good)
    if damage == "flipped-byte":
        blob[data.CACHE_HEADER_SIZE + 47_040_000 + 5] ^= 0x01  # one train label
    elif damage == "flipped-header":
        blob[20] ^= 0x01  # in the source key
    else:
        blob = blob[: len(blob) // 2]
    cache.write_bytes(bytes(blob))
    calls = _count_decodes(monkeypatch)
    _assert_identical(data.load_uint8(data_copy), _reference(data_copy))
    assert len(calls) == 2  # the load decoded again (and so did _reference)
    assert cache.read_bytes() == good  # rebuilt
    calls.clear()
    data.load_uint8(data_copy)
    assert not calls  # and used from then on


def test_cache_from_other_source_files_is_not_used(data_copy, private_cache, monkeypatch):
    raw = data_copy / "MNIST" / "raw"
    data.load_uint8(data_copy)
    old_cache = _cache_file(data_copy)
    old_bytes = old_cache.read_bytes()
    # Other source files: test label 0 changed, re-gzipped, its new SHA-256 declared the expected one.
    gz = raw / "t10k-labels-idx1-ubyte.gz"
    labels = bytearray(gzip.decompress(gz.read_bytes()))
    labels[8] = (labels[8] + 1) % 10
    gz.write_bytes(gzip.compress(bytes(labels), mtime=0))
    (raw / "t10k-labels-idx1-ubyte").unlink()  # the gunzipped copy is re-made from the new .gz
    monkeypatch.setitem(data.GZ_SHA256, gz.name, data.sha256_file(gz))
    new_cache = _cache_file(data_copy)
    assert new_cache != old_cache
    # Even a stale cache under the new name (same layout, other sources in its header) is not used.
    new_cache.write_bytes(old_bytes)
    got = data.load_uint8(data_copy)
    assert got[3][0].item() == labels[8]
    _assert_identical(got, _reference(data_copy))
    assert old_cache.read_bytes() == old_bytes  # left alone
    assert new_cache.read_bytes() != old_bytes  # rewritten from the new sources
    assert data.load_uint8(data_copy)[3][0].item() == labels[8]


def test_read_only_data_folder_keeps_the_cache_in_the_user_cache(data_copy, private_cache, monkeypatch):
    raw = data_copy / "MNIST" / "raw"
    monkeypatch.setattr(data, "_writable_dir", lambda path: Path(path) != raw and data_writable(path))
    data.load_uint8(data_copy)
    key = data.source_key(data.verify_gz(raw))
    assert not (raw / data.cache_name(key)).exists()
    assert (private_cache / data.cache_name(key)).exists()
    calls = _count_decodes(monkeypatch)
    _assert_identical(data.load_uint8(data_copy), _reference(data_copy))
    assert len(calls) == 1  # only _reference decoded: the load used the user cache


# ---- slant normalisation (--deskew) ------------------------------------------------------------------


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image (N, 1, 28, 28): centre of mass (row, col) and slant v_rc / v_rr, by brute force."""
    img = x[:, 0].double()
    r = torch.arange(28, dtype=torch.float64).view(1, 28, 1)
    c = torch.arange(28, dtype=torch.float64).view(1, 1, 28)
    m = img.sum((1, 2))
    mr, mc = (img * r).sum((1, 2)) / m, (img * c).sum((1, 2)) / m
    dr, dc = r - mr.view(-1, 1, 1), c - mc.view(-1, 1, 1)
    slant = (img * dr * dc).sum((1, 2)) / (img * dr * dr).sum((1, 2))
    return mr, mc, slant


def test_deskew_stands_a_slanted_stroke_upright_and_centres_it():
    x = torch.zeros(2, 1, 28, 28)
    for r in range(6, 22):  # a stroke leaning right by 0.5 pixel per row, off centre
        x[0, 0, r, round(6 + 0.5 * (r - 6))] = 1.0
        x[1, 0, r, 10] = 1.0  # upright, left of centre
    mr, mc, slant = _moments(x)
    assert slant[0].item() == pytest.approx(0.5, abs=0.03) and slant[1].item() == 0
    mr, mc, slant = _moments(data.deskew_images(x))
    assert slant.abs().max().item() < 0.02  # upright
    assert torch.allclose(mr, torch.full_like(mr, 14.0), atol=0.05)  # centre of mass at (14, 14)
    assert torch.allclose(mc, torch.full_like(mc, 14.0), atol=0.05)


def test_deskew_leaves_an_upright_centred_image_as_it_is():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 9:20, 13:16] = torch.rand(11, 3)
    x[0, 0, 9:20, 13] = x[0, 0, 9:20, 15] = 0.5  # symmetric about column 14: no slant
    x[0, 0, 9:20, 14] = 1.0
    x[0, 0, 8, 14] = x[0, 0, 20, 14] = 1.0  # symmetric about row 14
    mr, mc, slant = _moments(x)
    assert (mr.item(), mc.item(), slant.item()) == pytest.approx((14.0, 14.0, 0.0), abs=1e-9)
    torch.testing.assert_close(data.deskew_images(x), x, atol=1e-5, rtol=0)


def test_deskewed_mnist_is_upright_and_the_same_on_any_thread_count():
    ds = data.load(device="cpu")
    sample = ds.train_x[:3000]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = data.deskew_images(sample)
        torch.set_num_threads(2)
        two = data.deskew_images(sample)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # so a DDP rank, a pack and a lone run see the same pixels
    assert _moments(sample)[2].abs().mean() > 0.15  # MNIST's digits lean
    assert _moments(one)[2].abs().mean() < 0.01  # deskewed, they do not
    assert abs(one.sum().item() - sample.sum().item()) / sample.sum().item() < 0.02  # the ink is kept


def test_load_deskews_both_splits_then_standardises_with_their_own_statistics():
    plain = data.load(device="cpu")
    dsk = data.load(device="cpu", deskew=True)
    both = data.load(device="cpu", deskew=True, normalize=True)
    exact = data.deskew_images(plain.test_x)
    assert (dsk.test_x - exact).abs().max().item() <= 0.5 / 255 + 1e-6  # rounded to uint8, as MNIST is
    assert torch.equal(dsk.test_x, (exact * 255).round().clamp(0, 255) / 255)
    assert torch.equal(dsk.train_y, plain.train_y) and torch.equal(dsk.test_y, plain.test_y)
    # DESKEWED_MEAN / STD are the deskewed training pixels' mean and std, to 4 digits
    assert round(dsk.train_x.mean().item(), 4) == data.DESKEWED_MEAN
    assert round(dsk.train_x.std().item(), 4) == data.DESKEWED_STD
    assert torch.equal(both.train_x, (dsk.train_x - data.DESKEWED_MEAN) / data.DESKEWED_STD)


def test_the_deskewed_copy_is_cached_once_and_never_taken_for_the_decoded_one(
    data_copy, private_cache, monkeypatch
):
    calls = []
    real = data.deskew_images
    monkeypatch.setattr(data, "deskew_images", lambda x: calls.append(len(x)) or real(x))
    key = data.source_key(data.verify_gz(data_copy / "MNIST" / "raw"))
    raw = data_copy / "MNIST" / "raw"
    first = data.load_uint8(data_copy, deskew=True)
    assert calls == [60000, 10000] and (raw / data.cache_name(key, deskewed=True)).exists()
    assert first[0].dtype == torch.uint8 and first[0].shape == (60000, 28, 28)
    _assert_identical(first[1::2], data.load_uint8(data_copy)[1::2])  # the labels are MNIST's
    calls.clear()
    _assert_identical(data.load_uint8(data_copy, deskew=True), first)
    assert not calls  # from the cache
    plain = data.load_uint8(data_copy)  # the decoded cache is another file: not the deskewed pixels
    assert not torch.equal(plain[0], first[0]) and not calls
    # a decoded cache under the deskewed name (its header says so) is not used: deskewed again
    (raw / data.cache_name(key, deskewed=True)).write_bytes(_cache_file(data_copy).read_bytes())
    _assert_identical(data.load_uint8(data_copy, deskew=True), first)
    assert calls == [60000, 10000]
