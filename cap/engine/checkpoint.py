"""Atomic, checksummed checkpoints, and the signals that ask for one.

File layout: b"CAPCKPT1\\n" + sha256 hex of the payload + b"\\n" + the torch.save payload. A write goes
to a temporary file that is fsynced, then the previous `last.pt` becomes `prev.pt` and the temporary
file becomes `last.pt` (both renames atomic), so at every moment a complete checkpoint exists.
Loading verifies the checksum before unpickling (weights_only=True: tensors and plain containers
only) and falls back to `prev.pt` when `last.pt` is truncated, corrupt or belongs to another run. A write
that fails (a full disk) removes its temporary file and leaves `last.pt` as it was; temporaries of a
process that died while writing are removed by the next write.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MAGIC = b"CAPCKPT1\n"
LAST, PREV = "last.pt", "prev.pt"
CHECKPOINT_DIR = "checkpoints"
"""the folder of a run folder that holds LAST and PREV"""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not fit the run; the message names the file."""


class DiskFullError(OSError):
    """No space left for a checkpoint or the results; the message names the folder and what is intact."""

    def __str__(self) -> str:
        return str(self.strerror)


TMP_PREFIX = f".{LAST}.tmp-"


def save_checkpoint(payload: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(TMP_PREFIX + "*"):  # one writer per run: these are from a process that died
        stale.unlink(missing_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest().encode()
    tmp = directory / f"{TMP_PREFIX}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + digest + b"\n" + data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a half-written temporary only fills the disk further
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(directory, len(MAGIC) + len(digest) + 1 + len(data)) from exc
        raise
    last = directory / LAST
    if last.exists():
        if _intact(last):
            os.replace(last, directory / PREV)
        else:  # never rotate a damaged file over the good previous checkpoint
            last.unlink()
    os.replace(tmp, last)
    _fsync_dir(directory)
    return last


def _disk_full(directory: Path, needed: int) -> DiskFullError:
    free = shutil.disk_usage(directory).free
    intact = [str(directory / name) for name in (LAST, PREV) if (directory / name).exists()]
    kept = (f"the last good checkpoint is intact ({', '.join(intact)}); free space, then continue with: "
            f"cap train --resume {directory.parent}") if intact else "no checkpoint of this run was written yet"
    return DiskFullError(errno.ENOSPC, f"no space left on the device of {directory} for a checkpoint: it needs "
                         f"{_mb(needed)} free, {_mb(free)} are free; {kept}")


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _payload(raw: bytes) -> tuple[bytes, str, str] | None:
    """(payload, sha256 in the header, sha256 of the payload), or None without a cap checkpoint header."""
    header_end = len(MAGIC) + 64 + 1
    if not raw.startswith(MAGIC) or len(raw) < header_end:
        return None
    data = raw[header_end:]
    return data, raw[len(MAGIC):header_end - 1].decode(errors="replace"), hashlib.sha256(data).hexdigest()


def _intact(path: Path) -> bool:
    """Header and checksum of a checkpoint file are right (no unpickling)."""
    try:
        parts = _payload(path.read_bytes())
    except OSError:
        return False
    return parts is not None and parts[1] == parts[2]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of one checkpoint file, after checking its header and checksum."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    parts = _payload(raw)
    if parts is None:
        raise CheckpointError(f"checkpoint {path} is not a cap checkpoint (no '{MAGIC.decode().strip()}' header)")
    data, expected, actual = parts
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: sha256 of its {len(data)} payload bytes "
                              f"is {actual[:12]}..., the header says {expected[:12]}...")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the checksum matched, so this is a version or format problem
        raise CheckpointError(f"checkpoint {path} passed its checksum but cannot be loaded: {exc}") from exc


def load_latest(directory: Path, log: Callable[[str], None] = print,
                accept: Callable[[dict[str, Any], Path], str | None] | None = None) -> tuple[dict[str, Any], Path]:
    """The newest good checkpoint in `directory`: last.pt, else prev.pt (with a warning). `accept(payload, path)`
    returns why a readable checkpoint does not belong to this run (None: it does); such a file is passed over
    like a corrupt one."""
    problems = []
    for name in (LAST, PREV):
        path = directory / name
        if not path.exists():
            problems.append(f"{path} does not exist")
            continue
        try:
            payload = read_checkpoint(path)
            refused = accept(payload, path) if accept is not None else None
        except CheckpointError as exc:
            refused = str(exc)
        if refused is not None:
            problems.append(refused)
            if name == LAST:
                log(f"warning: {refused}; trying the previous checkpoint")
            continue
        if name == PREV:
            log(f"warning: resuming from the previous checkpoint {path}")
        return payload, path
    raise CheckpointError(f"no usable checkpoint in {directory}: " + "; ".join(problems))


class StopRequest:
    """Remembers a SIGTERM/SIGUSR1/SIGUSR2 (preemption, a scheduler's time-limit warning; USR2 is submitit's) or a
    Ctrl-C (SIGINT) until training can stop at a step boundary and write a checkpoint. A second Ctrl-C raises
    KeyboardInterrupt at once (the checkpoint files are atomic, so nothing saved is damaged). Handlers are
    installed only in the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # the user does not want to wait for the step to end
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. a Ray worker thread): leave signals alone
            self._previous.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
