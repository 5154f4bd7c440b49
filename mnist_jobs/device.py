"""Device selection and (later) distributed setup: everything about where a job runs lives here."""

from __future__ import annotations

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
