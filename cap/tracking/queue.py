"""The tracking files of a run folder: where the run lives, and the durable queue of unsent operations.

    tracking.json            where the run lives: {"uri", "experiment", "experiment_id", "run_id"}
                             (+ "local_id" when the run was opened while the server was away)
    tracking_pending.jsonl   operations not sent yet, one JSON object a line, oldest first
    tracking_rejected.jsonl  operations the store refused, with its answer
    .tracking.lock           serialises a training process and a concurrent `cap sync`

The queue of an earlier run of the same folder is set aside as tracking.<tag>.json and
tracking_pending.<tag>.jsonl (`set_aside`), where `queues` still finds it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

STATE_FILE = "tracking.json"
PENDING_FILE = "tracking_pending.jsonl"
REJECTED_FILE = "tracking_rejected.jsonl"
LOCK_FILE = ".tracking.lock"

_STATE_STEM, _STATE_SUFFIX = STATE_FILE.rsplit(".", 1)
_PENDING_STEM, _PENDING_SUFFIX = PENDING_FILE.rsplit(".", 1)


class TrackingFileError(ValueError):
    """A run folder's tracking state file is unreadable; the message names it and what it should hold."""


def read_json(path: Path) -> dict | None:
    """A state file's mapping; None if there is none; TrackingFileError if it is corrupt."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        data = exc
    if not isinstance(data, dict):
        reason = f"not valid JSON: {data}" if isinstance(data, Exception) else f"a {type(data).__name__}, not a mapping"
        raise TrackingFileError(f"{path} is corrupt ({reason}); it records the MLflow URI and run of the folder's "
                                "tracking operations, which are kept: restore it, or write it by hand with the keys "
                                '"uri", "experiment", "experiment_id" and "run_id"')
    return data


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_ops(path: Path) -> list[dict]:
    """Pending operations, oldest first; a torn last line (a kill while appending) is skipped."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    ops = []
    for line in lines:
        if line.strip():
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return ops


def write_ops(path: Path, ops: list[dict]) -> None:
    """Replace the queue with `ops` (atomically); no ops: no file."""
    if not ops:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(op) + "\n" for op in ops))
    os.replace(tmp, path)


def append_op(path: Path, op: dict) -> None:
    """One operation at the end of the queue, on disk at once: a run never finished loses nothing."""
    with open(path, "a") as fh:
        fh.write(json.dumps(op) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on the run's tracking files (a training process and `cap sync` may overlap)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    with open(run_dir / LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def aside_files(run_dir: Path, tag: str) -> tuple[Path, Path]:
    """(state file, pending file) of a run set aside under `tag`."""
    return (run_dir / f"{_STATE_STEM}.{tag}.{_STATE_SUFFIX}",
            run_dir / f"{_PENDING_STEM}.{tag}.{_PENDING_SUFFIX}")


def set_aside(run_dir: Path, state: dict, tag: str) -> Path:
    """Move the folder's queue (of the run `state` describes) to the names of `tag`; returns its new path."""
    state_file, pending = aside_files(run_dir, tag)
    os.replace(run_dir / PENDING_FILE, pending)
    write_json(state_file, state)
    return pending


def retire_state(run_dir: Path, tag: str) -> None:
    """Rename the folder's state file to the name of `tag` (kept for the record; no queue goes with it)."""
    (run_dir / STATE_FILE).rename(aside_files(run_dir, tag)[0])


def run_state(run_dir: Path) -> dict | None:
    """Where the folder's run lives (its STATE_FILE: uri, experiment, experiment_id, run_id); None if untracked."""
    return read_json(run_dir / STATE_FILE)


def recorded_run_id(run_dir: Path) -> str | None:
    """The MLflow run id in the folder's state file (None: no file, or the run was never created)."""
    state = run_state(run_dir)
    return state.get("run_id") if state else None


def queues(run_dir: Path) -> list[tuple[Path, Path]]:
    """(state file, pending file) pairs of a run folder: earlier runs set aside (oldest first), then its own."""
    prefix, suffix = f"{_PENDING_STEM}.", f".{_PENDING_SUFFIX}"
    pairs = []
    for pending in sorted(run_dir.glob(f"{prefix}*{suffix}"), key=lambda p: p.stat().st_mtime):
        pairs.append((aside_files(run_dir, pending.name[len(prefix):-len(suffix)])[0], pending))
    return pairs + [(run_dir / STATE_FILE, run_dir / PENDING_FILE)]


def pending_files(run_dir: Path) -> list[Path]:
    """The folder's queues that still hold operations (its own and earlier runs' set aside)."""
    return [pending for _, pending in queues(run_dir) if pending.exists()]
