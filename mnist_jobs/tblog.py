"""TensorBoard event files: each run's curves and hyperparameters in `<results folder>/tb/<run_id>/`.

    logs = RunLogs(results_dir, run_ids, configs)   # cheap: nothing imported yet
    logs.start(histories, resumed_from=None)         # rank 0, before the loop (a resume: its iteration)
    logs.add(m, histories[m][-1])                    # at each evaluation
    logs.close()

`tensorboard --logdir results/lr-study/tb` shows a sweep: one point per evaluation (step = the
iteration) for `train/loss`, `test/loss` and `test/accuracy`, the same numbers as the result's history,
and each run's config as an HParams session (group name: the run id), which the HParams dashboard
compares. A lone run's folder is `<results-dir>/tb/<run_id>/`, beside its result.

This module owns the format. It frames the records itself (TFRecord: length, masked CRC-32C, the
serialised `Event` proto from the `tensorboard` package, its masked CRC-32C) and writes them
synchronously, each evaluation at once: importing only the protos costs ~12 ms where
`torch.utils.tensorboard` costs ~45 ms (it loads tensorboard's TensorFlow stub), and nothing sits in a
writer thread's queue when a checkpoint is taken or the job is killed.

Every step exactly once, across requeues and resumes: a fresh run (no checkpoint) starts from an
empty folder. A resumed run first cuts every event file of its folder back to the restored iteration
(an attempt killed after its last checkpoint may have written later points: those are cut, and the
resumed loop writes them again), writes the restored history's points that no file holds (from an
attempt that had no tensorboard, or lost a write to a crash), and carries on in a new file of its own;
TensorBoard reads a folder's files as one run.

Optional: without the `tensorboard` package (`pip install 'mnist-jobs[tensorboard]'`) runs train as
usual and one warning per process says what to install. `MNIST_JOBS_TENSORBOARD=0` (or
`train_pack(..., tensorboard=False)`) turns it off. No torch in here.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import struct
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from .config import TRAIN_FIELDS, TrainConfig

ENV = "MNIST_JOBS_TENSORBOARD"
INSTALL_HINT = "pip install 'mnist-jobs[tensorboard]'"
FOLDER = "tb"
TAGS = (("train_loss", "train/loss"), ("test_loss", "test/loss"), ("test_accuracy", "test/accuracy"))
HPARAMS = tuple(k for k in TRAIN_FIELDS if k not in ("epochs", "device"))  # every training option
SESSION_START_TAG = "_hparams_/session_start_info"  # tensorboard.plugins.hparams.metadata's names
HPARAMS_PLUGIN = "hparams"
FILE_VERSION = "brain.Event:2"
_OFF = ("0", "false", "no", "off")
_warned: set[str] = set()
_file_counter = itertools.count()


def log_dir(results_dir: Path | str, run_id: str) -> Path:
    """A run's TensorBoard folder: `<results folder>/tb/<run_id>/`."""
    return Path(results_dir) / FOLDER / run_id


def wanted(flag: bool | None = None) -> bool:
    """True/False as given; None: on unless $MNIST_JOBS_TENSORBOARD says 0, false, no or off."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(ENV, "").strip().lower() not in _OFF


def warn_once(text: str) -> None:
    if text not in _warned:
        _warned.add(text)
        print(f"Warning: {text}", file=sys.stderr, flush=True)


# ---- records -------------------------------------------------------------------------------------

_CRC_TABLE: list[int] = []


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing. Records are ~100 bytes: a table loop."""
    if not _CRC_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC_TABLE.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord: little-endian u64 length, its masked CRC, the data, the data's masked CRC."""
    head = struct.pack("<Q", len(data))
    return head + struct.pack("<I", masked_crc(head)) + data + struct.pack("<I", masked_crc(data))


def records(blob: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(start, end, data) of each whole, intact record; stops at a torn or corrupt one."""
    pos = 0
    while pos + 12 <= len(blob):
        head = blob[pos : pos + 8]
        (n,) = struct.unpack("<Q", head)
        end = pos + 12 + n + 4
        if struct.unpack("<I", blob[pos + 8 : pos + 12])[0] != masked_crc(head) or end > len(blob):
            return
        data = blob[pos + 12 : pos + 12 + n]
        if struct.unpack("<I", blob[end - 4 : end])[0] != masked_crc(data):
            return
        yield pos, end, data
        pos = end


def _protos() -> Any:
    """The tensorboard package's protos (ImportError without it): only these, never its writer."""
    from types import SimpleNamespace

    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    return SimpleNamespace(
        event=event_pb2,
        summary=summary_pb2,
        tensor=tensor_pb2,
        shape=tensor_shape_pb2,
        types=types_pb2,
        hparams=plugin_data_pb2,
    )


def trim(folder: Path, upto: int, pb: Any) -> tuple[set[int], bool]:
    """Cut each event file in folder after the last record with step <= upto (and at a torn record);
    return the steps that still hold points, and whether an HParams session is there."""
    steps: set[int] = set()
    has_session = False
    for path in sorted(folder.glob("*tfevents*")) if folder.is_dir() else []:
        blob = path.read_bytes()
        keep = 0
        for start, end, data in records(blob):
            try:
                event = pb.event.Event.FromString(data)
            except Exception:  # not an Event: cut here
                break
            if event.step > upto:
                keep = start
                break
            values = event.summary.value
            has_session = has_session or any(v.tag == SESSION_START_TAG for v in values)
            if any(v.tag != SESSION_START_TAG for v in values):
                steps.add(event.step)
            keep = end
        if keep < len(blob):
            os.truncate(path, keep)
    return steps, has_session


def _stamps(folder: Path) -> list[int]:
    """The times in the names of the event files in folder."""
    out = []
    for path in folder.glob("events.out.tfevents.*"):
        part = path.name.split(".")[3]
        if part.isdigit():
            out.append(int(part))
    return out


class _EventFile:
    """A new event file of this attempt, written record by record (unbuffered: each point is in the
    file, the kernel's page cache, once `write` returns)."""

    def __init__(self, folder: Path, pb: Any) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().replace("/", "_") or "host"
        # TensorBoard reads a folder's files in name order: this attempt's must sort after the earlier
        # ones', even when it starts within the same second (the name's time is then one ahead)
        stamp = max([int(time.time()), *(t + 1 for t in _stamps(folder))])
        while True:
            name = f"events.out.tfevents.{stamp:010d}.{host}.{os.getpid()}.{next(_file_counter)}"
            try:
                self.file = open(folder / name, "xb", buffering=0)  # noqa: SIM115 (kept open: 0666 less umask)
                break
            except FileExistsError:
                continue
        self.pb = pb
        self.write(pb.event.Event(wall_time=time.time(), file_version=FILE_VERSION))

    def write(self, event: Any) -> None:
        self.file.write(frame(event.SerializeToString()))

    def point(self, entry: dict[str, Any]) -> None:
        """One evaluation of the history: its finite values at step = its iteration."""
        values = [
            self.pb.summary.Summary.Value(tag=tag, simple_value=float(entry[key]))
            for key, tag in TAGS
            if isinstance(entry.get(key), (int, float))
        ]
        if values:
            summary = self.pb.summary.Summary(value=values)
            self.write(
                self.pb.event.Event(wall_time=time.time(), step=int(entry["iteration"]), summary=summary)
            )

    def session(self, config: TrainConfig, run_id: str, started: float) -> None:
        """The HParams dashboard's session start: the config's hyperparameters."""
        pb = self.pb
        start = pb.hparams.SessionStartInfo(group_name=run_id, start_time_secs=started)
        for key in HPARAMS:
            v = getattr(config, key)
            if isinstance(v, bool):
                start.hparams[key].bool_value = v
            elif isinstance(v, (int, float)):
                start.hparams[key].number_value = float(v)
            elif v is not None:
                start.hparams[key].string_value = str(v)
        content = pb.hparams.HParamsPluginData(version=0, session_start_info=start).SerializeToString()
        meta = pb.summary.SummaryMetadata(
            plugin_data=pb.summary.SummaryMetadata.PluginData(plugin_name=HPARAMS_PLUGIN, content=content)
        )
        null = pb.tensor.TensorProto(  # what tensorboard's own hparams summary holds: a float of shape [0]
            dtype=pb.types.DT_FLOAT,
            tensor_shape=pb.shape.TensorShapeProto(dim=[pb.shape.TensorShapeProto.Dim()]),
        )
        value = pb.summary.Summary.Value(tag=SESSION_START_TAG, metadata=meta, tensor=null)
        self.write(pb.event.Event(wall_time=started, step=0, summary=pb.summary.Summary(value=[value])))

    def close(self) -> None:
        self.file.close()


class RunLogs:
    """The TensorBoard logs of one call's runs (a lone run, a pack's N; DDP: rank 0's only).

    Never fails a run: without tensorboard, or when a write fails, it warns once and stops logging."""

    def __init__(
        self,
        results_dir: Path | str,
        run_ids: Sequence[str],
        configs: Sequence[TrainConfig],
        enabled: bool = True,
        skip: Collection[str] = (),
    ) -> None:
        """`skip`: runs not logged (a pack's carried runs: another run's logs are theirs)."""
        self.dirs = [None if r in skip else log_dir(results_dir, r) for r in run_ids] if enabled else []
        self.run_ids, self.configs = list(run_ids), list(configs)
        self.files: list[_EventFile | None] = []
        self.started = False

    def dir_of(self, m: int) -> str | None:
        """Run m's folder, when this attempt logged there."""
        return str(self.dirs[m]) if self.started and self.dirs[m] is not None else None

    def start(self, histories: Sequence[list[dict[str, Any]]], resumed_from: int | None) -> None:
        if not self.dirs:
            return
        try:
            pb = _protos()
        except Exception as e:  # not installed (ImportError), or a protobuf that does not fit
            why = "not installed" if isinstance(e, ImportError) else f"unusable ({type(e).__name__}: {e})"
            warn_once(f"no TensorBoard logs: the tensorboard package is {why}; {INSTALL_HINT}")
            self.dirs = []
            return
        started = time.time()
        try:
            for m, folder in enumerate(self.dirs):
                if folder is None:
                    self.files.append(None)
                    continue
                if resumed_from is None:  # from scratch: an earlier attempt's curves are not this run's
                    shutil.rmtree(folder, ignore_errors=True)
                    steps, has_session = set(), False
                else:
                    steps, has_session = trim(folder, resumed_from, pb)
                f = _EventFile(folder, pb)
                self.files.append(f)
                self.started = True
                if not has_session:
                    f.session(self.configs[m], self.run_ids[m], started)
                for entry in histories[m]:  # a resume: the restored points no file holds
                    if entry["iteration"] not in steps:
                        f.point(entry)
        except OSError as e:
            self._give_up(e)

    def add(self, m: int, entry: dict[str, Any]) -> None:
        if self.files and (f := self.files[m]) is not None:
            try:
                f.point(entry)
            except OSError as e:
                self._give_up(e)

    def _give_up(self, e: OSError) -> None:
        where = getattr(e, "filename", None) or next(d for d in self.dirs if d is not None)
        warn_once(f"TensorBoard logs stopped: {e.strerror or e} ({where})")
        self.close()

    def close(self) -> None:
        for f in filter(None, self.files):
            with contextlib.suppress(OSError):
                f.close()
        self.files = []
