"""The channel of one run: sends its operations to the store, or keeps them queued while the store is away.

An operation is a JSON-able dict (`{"op": "metrics", ...}`), so it can wait on disk
(cap.tracking.queue) and be sent later, by the training process or by `cap sync`, with its
original step and timestamp.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cap.tracking.queue import (
    PENDING_FILE,
    REJECTED_FILE,
    STATE_FILE,
    append_op,
    locked,
    read_json,
    read_ops,
    write_json,
    write_ops,
)
from cap.tracking.store import Store, Unsendable, describe, http_settings, is_permanent

Log = Callable[[str], Any]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


class Channel:
    """Sends operations of one run to its store, or keeps them on disk while the store is away."""

    def __init__(self, run_dir: Path, state: dict, timeout: float, log: Log, state_file: Path | None = None,
                 pending_file: Path | None = None, during_training: bool = True) -> None:
        self.run_dir = run_dir
        self.state = state
        self.timeout = timeout
        self.log = log
        self.state_file = state_file or run_dir / STATE_FILE
        self.pending_file = pending_file or run_dir / PENDING_FILE
        self.rejected_file = run_dir / REJECTED_FILE
        self.during_training = during_training
        self.store = Store(state["uri"], timeout)
        self.down = False  # inside an outage: warned already, say so when it ends

    @property
    def uri(self) -> str:
        return self.state["uri"]

    # -- sending

    def send(self, op: dict) -> None:
        """One operation to the store; raises whatever mlflow raises."""
        kind = op["op"]
        with http_settings(self.timeout):
            if kind == "create_run":
                self._create_run(op)
                return
            run_id = self.run_id()
            sender = self._senders.get(kind)
            if sender is None:
                raise ValueError(f"unknown tracking operation {kind!r}")
            sender(self, run_id, op)

    def _send_metrics(self, run_id: str, op: dict) -> None:
        self.store.log_metrics(run_id, op["metrics"], int(op["step"]), int(op["timestamp"]))

    def _send_params(self, run_id: str, op: dict) -> None:
        self.store.log_params(run_id, op["params"])

    def _send_tags(self, run_id: str, op: dict) -> None:
        self.store.set_tags(run_id, op["tags"])

    def _send_artifact(self, run_id: str, op: dict) -> None:
        path = Path(op["path"])
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} no longer exists")
        self.store.log_artifact(run_id, path, op.get("artifact_path"))

    def _send_resume(self, run_id: str, op: dict) -> None:
        self.store.reopen(run_id)

    def _send_terminate(self, run_id: str, op: dict) -> None:
        self.store.terminate(run_id, op["status"], end_time=int(op["end_time"]))

    _senders: dict[str, Callable[[Channel, str, dict], None]] = {
        "metrics": _send_metrics, "params": _send_params, "tags": _send_tags, "artifact": _send_artifact,
        "resume": _send_resume, "terminate": _send_terminate,
    }

    def run_id(self) -> str:
        """The run's MLflow id; raises Unsendable while the run was never created."""
        if self.state.get("run_id") is None:  # `cap sync` in another process may have created it
            on_disk = read_json(self.state_file) or {}
            if on_disk.get("local_id") == self.state.get("local_id") and on_disk.get("run_id"):
                self.state.update(run_id=on_disk["run_id"], experiment_id=on_disk.get("experiment_id"))
        if self.state.get("run_id") is None:
            raise Unsendable(f"{self.pending_file}: the run was never created (its create_run operation is gone)")
        return self.state["run_id"]

    def _create_run(self, op: dict) -> None:
        if self.state.get("run_id"):  # created already; the pending file was not rewritten in time
            return
        experiment_id, run_id = self.store.create_run(op["experiment"], op.get("run_name"), op.get("tags") or {},
                                                      start_time=int(op["start_time"]))
        self.state.update(experiment_id=experiment_id, run_id=run_id)
        write_json(self.state_file, self.state)  # before the op leaves the queue: no second run on a crash

    # -- queueing

    def submit(self, op: dict) -> None:
        """Send `op` (after what is pending), or keep it on disk; never raises for the store's problems."""
        with locked(self.run_dir):
            if self.pending_file.exists():
                self.append(op)  # behind what waits, so the order on the server is the order of the calls
                self._flush(current=1)
                return
            try:
                self.send(op)
            except Exception as exc:  # noqa: BLE001 - any failure of the store must not stop training
                if is_permanent(exc):
                    self._reject(op, exc)
                else:
                    self.append(op)
                    self.went_down(exc)
                return
            if self.down:
                self.down = False
                self.log(f"tracking server {self.uri} is back")

    def flush(self) -> int:
        """Send pending operations in order until one fails; returns how many went through."""
        with locked(self.run_dir):
            return self._flush()

    def _flush(self, current: int = 0) -> int:
        """`current`: the last op is the caller's own, not counted as pending in the message."""
        ops = read_ops(self.pending_file)
        sent = 0
        for i, op in enumerate(ops):
            try:
                self.send(op)
            except Exception as exc:  # noqa: BLE001
                if is_permanent(exc):
                    self._reject(op, exc)
                    write_ops(self.pending_file, ops[i + 1:])
                    continue
                if i:  # else nothing left the queue: no rewrite on every call of an outage
                    write_ops(self.pending_file, ops[i:])
                self.went_down(exc)
                return sent
            sent += 1
            write_ops(self.pending_file, ops[i + 1:])  # progress on disk: a crash resends at most one op
        self.pending_file.unlink(missing_ok=True)
        if ops and (self.down or sent):
            n = max(sent - current, 0)
            self.log(f"tracking server {self.uri} reachable again: sent {_plural(n, 'pending operation')} "
                     f"from {self.pending_file}")
        self.down = False
        return sent

    def append(self, op: dict) -> None:
        """`op` at the end of the queue (the caller holds the lock)."""
        append_op(self.pending_file, op)

    def went_down(self, exc: BaseException) -> None:
        """The store failed in a way that may pass: warn, once per outage."""
        if self.down:
            return
        self.down = True
        ops = _plural(len(read_ops(self.pending_file)), "pending operation")
        reason = describe(exc, self.timeout)
        if self.during_training:
            self.log(f"warning: tracking server {self.uri} unreachable ({reason}): training "
                     f"goes on, {ops} kept in {self.pending_file}; they are sent when it is back, "
                     f"or with `cap sync {self.run_dir}`")
        else:
            self.log(f"warning: tracking server {self.uri} unreachable ({reason}): "
                     f"{ops} stay in {self.pending_file}; run `cap sync {self.run_dir}` again when it is back")

    def _reject(self, op: dict, exc: BaseException) -> None:
        with open(self.rejected_file, "a") as fh:
            fh.write(json.dumps({**op, "error": str(exc)[:2000]}) + "\n")
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        self.log(f"warning: tracking store {self.uri} refused a '{op['op']}' operation ({first}); "
                 f"kept in {self.rejected_file}, later operations go on")
