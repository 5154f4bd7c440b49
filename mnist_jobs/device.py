"""Where a job runs: device selection and all distributed (DDP) setup live in this one module."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch


class DeviceError(RuntimeError):
    """The requested device does not exist on this machine."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def select_device(spec: str = "auto") -> torch.device:
    """auto: cuda, then mps, then cpu. An explicit device that is not there is an error."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise DeviceError("--device mps requested but MPS is not available on this machine")
        return torch.device("mps")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec} requested but CUDA is not available on this machine")
        index = int(spec.split(":", 1)[1]) if ":" in spec else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"--device {spec} requested but only {count} CUDA device(s) are visible")
        return torch.device("cuda", index)
    raise DeviceError(f"--device must be auto, cpu, cuda, cuda:N or mps (got {spec!r})")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    import platform

    return platform.processor() or platform.machine() or "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---- distributed ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DistInfo:
    """Where this process sits in a job. world_size 1 = plain single-process training."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = DistInfo()


def dist_timeout_s() -> float:
    """How long a collective may wait for a peer before the job fails (a crashed rank)."""
    return float(os.environ.get("MNIST_JOBS_DIST_TIMEOUT_S", "120"))


def rank_device(spec: str, dist: DistInfo) -> torch.device:
    """The device of this rank: cuda:local_rank when training on CUDA, else what select_device says."""
    device = select_device(spec)
    if dist.distributed and device.type == "cuda":
        count = torch.cuda.device_count()
        if dist.local_world_size > count:
            raise DeviceError(
                f"{dist.local_world_size} tasks per node but only {count} CUDA device(s) visible: "
                "use --tasks-per-node <= --gpus-per-node"
            )
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if dist.distributed and device.type == "mps":
        raise DeviceError("DistributedDataParallel is not supported on MPS: use --device cpu")
    return device


@contextlib.contextmanager
def process_group(dist: DistInfo, device: torch.device) -> Iterator[str | None]:
    """Init the process group (nccl on CUDA, gloo on CPU) for the block; destroy it on every exit."""
    if not dist.distributed:
        yield None
        return
    import torch.distributed as tdist

    backend = "nccl" if device.type == "cuda" else "gloo"
    tdist.init_process_group(
        backend=backend,
        init_method=f"tcp://{dist.master_addr}:{dist.master_port}",
        rank=dist.rank,
        world_size=dist.world_size,
        timeout=_dt.timedelta(seconds=dist_timeout_s()),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield backend
    finally:
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()


class PeerLost(RuntimeError):
    """A DDP rank lost its peers (a node died, a rank was killed, the network went away) before the run
    ended: nothing is wrong with the run itself. No record is written; the last checkpoint carries the
    run, and whatever starts the job again (SLURM's requeue of a failed node's job, or `sweep` run
    again) resumes it from there."""


# What torch.distributed raises when a peer is gone: its own network/store errors, and gloo's / NCCL's
# transport errors (plain RuntimeErrors) for a reset or closed connection or a collective that timed out.
_PEER_LOST_MESSAGES = (
    "connection reset",
    "connection closed",
    "broken pipe",
    "timed out",
    "timeout",
    "no route to host",
    "connection refused",
    "gloo/transport",
    "nccl communicator was aborted",
)


def is_peer_lost(error: BaseException) -> bool:
    """Whether `error`, raised in a distributed run, says a peer is gone rather than the run failed."""
    import torch.distributed as tdist

    if isinstance(error, PeerLost):
        return True
    lost_types = tuple(
        t for t in (getattr(tdist, n, None) for n in ("DistNetworkError", "DistStoreError")) if t
    )
    if lost_types and isinstance(error, lost_types):
        return True
    if not isinstance(error, RuntimeError):
        return False
    message = str(error).lower()
    return any(m in message for m in _PEER_LOST_MESSAGES)


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        for t in tensors:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
