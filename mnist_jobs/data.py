"""MNIST from the real IDX files, verified, decoded once into tensors kept on the training device.

The repo ships the four .gz files in `data/MNIST/raw/`. They are checked against SHA-256 sums, then
gunzipped (once, atomically) next to them — or into a user cache folder when that one is read-only —
because `torchvision.datasets.MNIST` reads the uncompressed files. Training never goes through
PIL/ToTensor: the whole split becomes one float tensor (pixels / 255, exactly what ToTensor gives), and
batches are index gathers from a per-epoch permutation.

torchvision decodes the files on first use only: its uint8 images and labels are then kept beside the
data in one file, `mnist-decoded-<key>-ubyte` (a header naming the source .gz files' SHA-256 sums and a
CRC-32 of the payload, then the four arrays as raw bytes), written atomically. A later run verifies the
.gz files as always, reads that file back and checks it, and so never imports torchvision (about 1.3 s
of start-up). A cache made from other source files, or a truncated or corrupt one, is not used: the
files are decoded again and the cache rewritten.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import mmap
import os
import shutil
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .results import atomic_write_bytes, default_file_mode, open_temp_beside

if TYPE_CHECKING:  # (torch is imported where tensors are made: verifying the files needs none)
    import torch

# SHA-256 of the shipped .gz files and of their uncompressed contents.
GZ_SHA256 = {
    "train-images-idx3-ubyte.gz": "b09d8b89df4ad239afc76a323dbe9559169cd8cca365467dfe8aa1f7ca54109b",
    "train-labels-idx1-ubyte.gz": "c51906e7929bbf7c824fbd16019b56297269ca82cba449c5b5d59c0a02147fed",
    "t10k-images-idx3-ubyte.gz": "f72c2dff3457595ec2fe452d25d97b7f974a74ad5b006687704212bedd1486d8",
    "t10k-labels-idx1-ubyte.gz": "4baf84ddd60ae342cfdd282ec3fba3249a201a4459782165496a7cbebbe49a2e",
}
RAW_SIZES = {  # bytes of the uncompressed IDX files (header + payload)
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}


class DataError(RuntimeError):
    """MNIST files missing, corrupt or unreadable. The message names the file and what to do."""


def default_data_dir() -> Path:
    """$MNIST_JOBS_DATA_DIR, else the repo's `data/` (shipped copy), else ~/.cache/mnist_jobs/data."""
    env = os.environ.get("MNIST_JOBS_DATA_DIR")
    if env:
        return Path(env)
    repo_data = Path(__file__).resolve().parent.parent / "data"
    if (repo_data / "MNIST" / "raw").is_dir():
        return repo_data
    return _cache_root() / "data"


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnist_jobs"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_gz(raw_dir: Path) -> dict[str, str]:
    """Check every shipped .gz against its SHA-256; raise DataError naming the first bad file.
    Returns the verified digests by file name."""
    digests = {}
    for name, expected in GZ_SHA256.items():
        path = raw_dir / name
        try:
            actual = sha256_file(path)
        except OSError as e:
            raise DataError(f"cannot read MNIST file {path}: {e.strerror}") from None
        if actual != expected:
            raise DataError(
                f"MNIST file {path} is corrupt or truncated (SHA-256 {actual[:12]}…, expected "
                f"{expected[:12]}…); restore it from git (`git checkout -- {name}`) or the original"
            )
        digests[name] = actual
    return digests


def _extract(gz_path: Path, out_path: Path) -> None:
    """gunzip to a temp file in the target folder, then rename: concurrent jobs never see half a file.
    The copy gets the mode any new file gets (0666 less the umask), so others sharing the folder can
    read it."""
    fd, tmp = open_temp_beside(out_path)
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(gz_path, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _usable_copy(out: Path) -> bool:
    """Whether an earlier gunzipped copy can be used as it is: complete and readable by us. A copy of
    ours that an older mnist-jobs left private (0600, from tempfile.mkstemp) is opened up to the mode
    a new file gets, so the people sharing the folder can read it too."""
    try:
        st = out.stat()
    except OSError:
        return False
    if st.st_size != RAW_SIZES[out.name] or not os.access(out, os.R_OK):
        return False  # incomplete, or someone else's unreadable copy: extract it again (atomically)
    if stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == getattr(os, "getuid", lambda: -1)():
        with contextlib.suppress(OSError):
            os.chmod(out, default_file_mode())
    return True


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def prepare(data_dir: Path | str | None = None, *, download: bool = True) -> Path:
    """Make `<root>/MNIST/raw/` hold verified uncompressed IDX files; return the torchvision root."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    raw_dir = data_dir / "MNIST" / "raw"
    gz_present = [n for n in GZ_SHA256 if (raw_dir / n).exists()]
    if len(gz_present) == len(GZ_SHA256):
        verify_gz(raw_dir)
        root = data_dir if _writable_dir(raw_dir) else _cache_root() / "data"
        out_dir = root / "MNIST" / "raw"
        out_dir.mkdir(parents=True, exist_ok=True)
        for gz_name in GZ_SHA256:
            out = out_dir / gz_name[: -len(".gz")]
            if not _usable_copy(out):
                _extract(raw_dir / gz_name, out)
        return root
    if gz_present:
        missing = sorted(set(GZ_SHA256) - set(gz_present))
        raise DataError(f"MNIST files missing in {raw_dir}: {', '.join(missing)}")
    if all((raw_dir / n).exists() for n in RAW_SIZES):  # an uncompressed copy (e.g. torchvision's)
        _check_raw_sizes(raw_dir)
        return data_dir
    if download:
        try:
            from torchvision.datasets import MNIST

            MNIST(str(data_dir), train=True, download=True)
            MNIST(str(data_dir), train=False, download=True)
            _check_raw_sizes(raw_dir)
            return data_dir
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                f"MNIST not found in {raw_dir} and the download failed ({reason}); copy the four "
                "MNIST .gz files there, or pass --data-dir pointing at a folder with MNIST/raw/"
            ) from None
    raise DataError(f"MNIST not found in {raw_dir}; pass --data-dir pointing at a copy")


def _check_raw_sizes(raw_dir: Path) -> None:
    for name, size in RAW_SIZES.items():
        path = raw_dir / name
        if not path.exists() or path.stat().st_size != size:
            raise DataError(f"MNIST file {path} is missing or has the wrong size (expected {size})")


@dataclass(frozen=True)
class MnistTensors:
    """Both splits as float tensors in [0, 1] (N, 1, 28, 28) and int64 labels, on one device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def to(self, device: torch.device) -> MnistTensors:
        return MnistTensors(*(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y)))


# ---- the decoded cache ---------------------------------------------------------------------------

N_TRAIN, N_TEST, PIXELS = 60000, 10000, 28 * 28
CACHE_MAGIC = b"mnist-jobs u8 1\n"  # 16 bytes; bump the digit if the layout changes
DESKEWED_MAGIC = b"mnist-jobs dk 1\n"  # the deskewed copy (--deskew on): same layout, other pixels
_HEADER = struct.Struct("<16s64sQQQI")  # magic, source key, n_train, n_test, pixels, CRC-32 of payload
CACHE_HEADER_SIZE = 128
# payload: train images, train labels, test images, test labels, all uint8, back to back
_PAYLOAD = (N_TRAIN * PIXELS, N_TRAIN, N_TEST * PIXELS, N_TEST)
CACHE_PAYLOAD_SIZE = sum(_PAYLOAD)


def source_key(digests: dict[str, str]) -> str:
    """One SHA-256 over the source .gz files' names and digests, what a decoded cache was made from:
    the SHA-256 of their SHA256SUMS file (`sha256sum *.gz` output, sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{digests[name]}  {name}\n".encode())
    return h.hexdigest()


def cache_name(key: str, deskewed: bool = False) -> str:
    # ends in -ubyte so that .gitignore's `data/MNIST/raw/*-ubyte` covers it, like the gunzipped copies
    return f"mnist-{'deskewed' if deskewed else 'decoded'}-{key[:16]}-ubyte"


def _cache_dirs(data_dir: Path) -> list[Path]:
    """Where a decoded cache may be: beside the data, then the user cache (used when that is read-only)."""
    dirs = [data_dir / "MNIST" / "raw", _cache_root() / "data" / "MNIST" / "raw"]
    return dirs if dirs[0].resolve() != dirs[1].resolve() else dirs[:1]


def _read_cache(path: Path, key: str, magic: bytes = CACHE_MAGIC) -> tuple[torch.Tensor, ...] | None:
    """The four uint8 arrays from a decoded cache, or None if it is missing, from other sources,
    truncated or corrupt."""
    import torch

    size = CACHE_HEADER_SIZE + CACHE_PAYLOAD_SIZE
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != size:
                return None
            # A private (copy-on-write) mapping: no 55 MB buffer to allocate and copy into, about
            # 35 ms less than readinto(). Our writers replace the file by rename, never in place.
            buf = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    got_magic, got_key, n_train, n_test, pixels, crc = _HEADER.unpack_from(buf)
    if (got_magic, got_key, n_train, n_test, pixels) != (magic, key.encode(), N_TRAIN, N_TEST, PIXELS):
        return None
    if zlib.crc32(memoryview(buf)[CACHE_HEADER_SIZE:]) != crc:
        return None
    flat = torch.frombuffer(buf, dtype=torch.uint8)
    out, off = [], CACHE_HEADER_SIZE
    for n in _PAYLOAD:
        out.append(flat[off : off + n])
        off += n
    train_x, train_y, test_x, test_y = out
    return (
        train_x.view(N_TRAIN, 28, 28),
        train_y.long(),  # torchvision's targets are int64
        test_x.view(N_TEST, 28, 28),
        test_y.long(),
    )


def _write_cache(path: Path, key: str, arrays: tuple[torch.Tensor, ...], magic: bytes = CACHE_MAGIC) -> None:
    """Write the decoded cache atomically; a failure only costs the next run a decode."""
    import torch

    train_x, train_y, test_x, test_y = arrays
    parts = [
        train_x.contiguous().numpy().tobytes(),
        train_y.to(torch.uint8).numpy().tobytes(),
        test_x.contiguous().numpy().tobytes(),
        test_y.to(torch.uint8).numpy().tobytes(),
    ]
    if [len(p) for p in parts] != list(_PAYLOAD):
        return  # not MNIST's shapes: keep decoding every time rather than cache something odd
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    header = _HEADER.pack(magic, key.encode(), N_TRAIN, N_TEST, PIXELS, crc)
    with contextlib.suppress(OSError):  # e.g. a full disk: the next run decodes again
        atomic_write_bytes(path, b"".join([header.ljust(CACHE_HEADER_SIZE, b"\0"), *parts]))


def _decode(root: Path) -> tuple[torch.Tensor, ...]:
    """torchvision's decode of the uncompressed IDX files under `root/MNIST/raw`: uint8 images
    (N, 28, 28) and int64 labels, train then test."""
    from torchvision.datasets import MNIST

    try:
        train = MNIST(str(root), train=True, download=False)
        test = MNIST(str(root), train=False, download=False)
    except Exception as e:
        raise DataError(f"cannot decode MNIST in {root}/MNIST/raw: {e}") from None
    return train.data, train.targets, test.data, test.targets


def load_uint8(data_dir: Path | str | None = None, *, deskew: bool = False) -> tuple[torch.Tensor, ...]:
    """Verified MNIST as torchvision decodes it: (train images uint8 (60000, 28, 28), train labels
    int64, test images, test labels). From the decoded cache when a valid one exists; otherwise
    decoded by torchvision, and the cache written for the next run.

    `deskew`: the images slant-normalised (`deskew_images`) and rounded back to uint8, as MNIST stores
    its pixels, from their own cache beside the decoded one (made on first use, ~1 s), so a deskewed run
    loads as fast as a plain one and every device gets the same pixels."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    raw_dir = data_dir / "MNIST" / "raw"
    key, magic = None, DESKEWED_MAGIC if deskew else CACHE_MAGIC
    if all((raw_dir / n).exists() for n in GZ_SHA256):
        key = source_key(verify_gz(raw_dir))
        for folder in _cache_dirs(data_dir):
            arrays = _read_cache(folder / cache_name(key, deskew), key, magic)
            if arrays is not None:
                return arrays
    root = prepare(data_dir)  # verifies again, gunzips if needed, raises DataError for what is missing
    if deskew:
        train_x, train_y, test_x, test_y = load_uint8(data_dir)
        arrays = (_deskewed_u8(train_x), train_y, _deskewed_u8(test_x), test_y)
    else:
        arrays = _decode(root)
    if key is not None:  # no cache for an uncompressed-only copy: nothing to key it to cheaply
        _write_cache(root / "MNIST" / "raw" / cache_name(key, deskew), key, arrays, magic)
    return arrays


def _deskewed_u8(u8: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 28, 28), deskewed (on the CPU) and rounded back to uint8."""
    x = deskew_images(u8.unsqueeze(1).float().div_(255.0))
    return x.mul_(255.0).round_().clamp_(0, 255).to(u8.dtype)[:, 0]


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of the training pixels in [0, 1]: the usual Normalize()
DESKEWED_MEAN, DESKEWED_STD = 0.1307, 0.2891  # the same after `deskew_images` (test_data.py checks)
DESKEW_CHUNK = 10_000  # images per grid_sample call (its sampling grid: 63 MB of floats per 10 000)


def deskew_images(x: torch.Tensor) -> torch.Tensor:
    """Slant normalisation (MNIST's classic "deskewing", LeCun et al. 1998): each image (N, 1, 28, 28)
    is sheared along its rows so that its ink's principal axis stands upright, and shifted so that its
    centre of mass sits at (14, 14), sampled bilinearly with zeros outside.

    From the image moments: the centre of mass (r̄, c̄), the row variance v_rr and the covariance v_rc
    give the slant alpha = v_rc / v_rr; output pixel (r, c) reads input (r + r̄ - 14, c + alpha (r - 14)
    + c̄ - 14). The moments are sums of row and column masses in float64 (the same on any thread
    count), and nothing depends on another image. Runs read the result from `load_uint8(deskew=True)`'s
    cache."""
    import torch
    from torch.nn import functional as F

    n = x.shape[0]
    img = x[:, 0].double()
    idx = torch.arange(28, dtype=torch.float64, device=x.device)
    rows, cols = img.sum(2), img.sum(1)  # (N, 28): the ink in each row, in each column
    mass = rows.sum(1).clamp_min(1e-12)
    mr, mc = rows @ idx / mass, cols @ idx / mass
    v_rr = rows @ (idx * idx) / mass - mr * mr
    v_rc = (img @ idx) @ idx / mass - mr * mc
    alpha = torch.where(v_rr > 1e-9, v_rc / v_rr.clamp_min(1e-9), torch.zeros_like(v_rr))  # blank: 0
    shear, off_r, off_c = (t.float().view(-1, 1, 1) for t in (alpha, mr - 14.0, mc - 14.0 * alpha - 14.0))
    o = torch.arange(28, dtype=torch.float32, device=x.device)
    r, c = o.view(1, 28, 1), o.view(1, 1, 28)
    out = torch.empty_like(x)
    for start in range(0, n, DESKEW_CHUNK):
        part = slice(start, min(n, start + DESKEW_CHUNK))
        m = part.stop - part.start
        src_r = (r + off_r[part]).expand(m, 28, 28)
        src_c = shear[part] * r + c + off_c[part]
        grid = torch.stack([(2 * src_c + 1) / 28 - 1, (2 * src_r + 1) / 28 - 1], dim=-1)  # (x, y) in [-1, 1]
        out[part] = F.grid_sample(x[part], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out


def load(
    data_dir: Path | str | None = None,
    *,
    device: torch.device | str = "cpu",
    normalize: bool = False,
    deskew: bool = False,
) -> MnistTensors:
    """Verify, decode (torchvision's MNIST reader, or its cached output), scale like ToTensor, move
    to `device`. With `deskew` (--deskew on) both splits are slant-normalised (`load_uint8`'s cached
    deskewed copy). With `normalize` (--normalize on) they are then standardised as
    transforms.Normalize((0.1307,), (0.3081,)) does, or, deskewed, with their own mean and std."""
    import torch

    train_x, train_y, test_x, test_y = load_uint8(data_dir, deskew=deskew)
    device = torch.device(device)
    mean, std = (DESKEWED_MEAN, DESKEWED_STD) if deskew else (MNIST_MEAN, MNIST_STD)

    def images(u8: torch.Tensor) -> torch.Tensor:
        # Same values as transforms.ToTensor(): uint8 -> float32 / 255, shape (N, 1, 28, 28).
        x = u8.to(device).unsqueeze(1).float().div_(255.0)
        return x.sub_(mean).div_(std) if normalize else x

    return MnistTensors(images(train_x), train_y.to(device), images(test_x), test_y.to(device))


def epoch_batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> list[torch.Tensor]:
    """One epoch of shuffled index batches (last one partial, as DataLoader(shuffle=True))."""
    import torch

    perm = torch.randperm(n, generator=generator).to(device)
    return list(perm.split(batch_size))
