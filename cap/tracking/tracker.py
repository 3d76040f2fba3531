"""The tracker of a training run (`open_tracker`), and `sync_pending` for what a run left unsent."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cap.tracking.channel import Channel, Log
from cap.tracking.links import ui_hint
from cap.tracking.queue import (
    PENDING_FILE,
    STATE_FILE,
    locked,
    pending_files,
    queues,
    read_json,
    read_ops,
    set_aside,
    write_json,
)
from cap.tracking.store import DEFAULT_TIMEOUT, Unsendable, is_permanent, now_ms, param_values, tag_values
from cap.tracking.uri import is_server, resolve_uri

if TYPE_CHECKING:
    from cap.tracking.config import TrackingConfig

LOCAL_ID_PREFIX = "local-"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists (and empty dicts) are kept as values."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class NullTracker:
    """Tracking switched off (or a rank other than 0): every method does nothing."""

    run_id: str | None = None
    uri: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def ui_hint(self) -> str | None:
        return None


class Tracker:
    """One MLflow run, logged through an MlflowClient (no global state: several may live in one process).

    Never raises because of the store: failed operations wait in the run folder (see cap.tracking).
    `run_id` is the MLflow run id; for a run opened while the server was away it is a local id
    (`local-...`) until the run could be created, and `open_tracker` accepts either for a resume.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._finished = False

    @property
    def run_id(self) -> str:
        state = self._channel.state
        if not state.get("run_id"):
            with contextlib.suppress(Unsendable):
                self._channel.run_id()  # `cap sync` in another process may have created it meanwhile
        return state.get("run_id") or state["local_id"]

    @property
    def uri(self) -> str:
        return self._channel.uri

    @property
    def pending_file(self) -> Path:
        return self._channel.pending_file

    def log_params(self, params: dict[str, Any]) -> None:
        """Values are stringified and cut to mlflow's MAX_PARAM_LEN characters (with a note)."""
        if params:
            self._channel.submit({"op": "params", "params": param_values(params)})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """All metrics of one step in one request; step and timestamp are kept if it has to wait."""
        if not metrics:
            return
        values = {}
        for key, value in metrics.items():
            try:
                values[str(key)] = float(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"metric {key!r}: {value!r} is not a number") from exc
        self._channel.submit({"op": "metrics", "metrics": values, "step": int(step), "timestamp": now_ms()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (or folder) by absolute path; it is read when sent, so keep it in place until then."""
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        self._channel.submit({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            self._channel.submit({"op": "tags", "tags": tag_values(tags)})

    def ui_hint(self) -> str | None:
        """Where to see this run's experiment in the MLflow UI (cap.tracking.links.ui_hint); None where the run's
        tracking state does not name its experiment."""
        state = self._channel.state
        if not state.get("experiment"):
            return None
        return ui_hint(self.uri, state["experiment"], state.get("experiment_id"))

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED) after a last attempt to send what is pending."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"finish: status {status!r}, expected FINISHED, FAILED or KILLED")
        if self._finished:
            return
        self._finished = True
        channel = self._channel
        channel.submit({"op": "terminate", "status": status, "end_time": now_ms()})
        n = len(read_ops(channel.pending_file))
        state = channel.state
        if not n and is_server(self.uri) and state.get("experiment_id"):
            channel.log(f"MLflow run {state['run_id']} ended {status}: {self.uri.rstrip('/')}/#/experiments/"
                        f"{state['experiment_id']}/runs/{state['run_id']}")
        if n:
            channel.log(f"warning: {n} tracking operation{'s' if n != 1 else ''} (including the end of the "
                        f"run) could not be sent to {self.uri}; they are kept in {channel.pending_file}: "
                        f"send them with `cap sync {channel.run_dir}` once the server is back")


def _state(run_dir: Path, cfg: TrackingConfig, uri: str, resume_run_id: str | None, log: Log) -> dict:
    """The run's state: the one on disk when resuming it, else a new one (an earlier run's queue set aside)."""
    old = read_json(run_dir / STATE_FILE)
    with locked(run_dir):
        if resume_run_id and old and resume_run_id in (old.get("run_id"), old.get("local_id")):
            return old  # our own run: what is pending belongs to it and is sent first
        if old and (run_dir / PENDING_FILE).exists():
            tag = old.get("run_id") or old.get("local_id") or f"unknown-{uuid.uuid4().hex[:8]}"
            pending = set_aside(run_dir, old, tag)
            log(f"warning: {run_dir} holds unsent operations of an earlier MLflow run ({tag}); moved to "
                f"{pending}, send them with `cap sync {run_dir}`")
        return {"uri": uri, "experiment": cfg.experiment, "experiment_id": None, "run_id": resume_run_id}


def _send_or_queue(channel: Channel, op: dict, refused: str) -> None:
    """Send `op` now; queue it if the store is away; a refusal raises RuntimeError(refused + the answer)."""
    try:
        channel.send(op)
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, RuntimeError) and op["op"] == "create_run":
            raise  # a deleted experiment (ensure_experiment)
        if is_permanent(exc):
            raise RuntimeError(f"{refused}: {exc}") from exc
        if op["op"] == "create_run":
            channel.state["local_id"] = LOCAL_ID_PREFIX + uuid.uuid4().hex
            write_json(channel.state_file, channel.state)
        with locked(channel.run_dir):
            channel.append(op)
        channel.went_down(exc)


def _resume(channel: Channel, resume_run_id: str, uri: str) -> None:
    state = channel.state
    write_json(channel.state_file, state)
    op = {"op": "resume", "time": now_ms()}
    if channel.pending_file.exists():
        channel.submit(op)  # behind what is pending, in order
    else:
        _send_or_queue(channel, op, f"cannot continue MLflow run {resume_run_id} at {uri}")
    if state.get("run_id") and not state.get("experiment_id"):
        with contextlib.suppress(Exception):
            state["experiment_id"] = channel.store.run_info(state["run_id"]).experiment_id
            write_json(channel.state_file, state)


def open_tracker(cfg: TrackingConfig, run_dir: Path, resume_run_id: str | None = None,
                 log: Log = print) -> Tracker | NullTracker:
    """Open (or, with `resume_run_id`, continue) the MLflow run of `run_dir`; writes its STATE_FILE.

    If the server cannot be reached the run is opened locally and created when it is back. A store
    that refuses outright (deleted experiment, unknown run to resume) raises RuntimeError: that is a
    configuration problem to fix before training, not an outage.
    """
    if not cfg.enabled:
        return NullTracker()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = resolve_uri(cfg.uri)
    channel = Channel(run_dir, _state(run_dir, cfg, uri, resume_run_id, log), cfg.timeout, log)
    if resume_run_id:
        _resume(channel, resume_run_id, uri)
        return Tracker(channel)
    tags = {"cap.run_dir": str(run_dir.resolve())}
    if cfg.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.parent_run_id
    op = {"op": "create_run", "experiment": cfg.experiment, "run_name": cfg.run_name or run_dir.resolve().name,
          "start_time": now_ms(), "tags": tags}
    # writes the STATE_FILE with the run id
    _send_or_queue(channel, op, f"cannot open an MLflow run in experiment '{cfg.experiment}' at {uri}")
    return Tracker(channel)


def sync_pending(run_dir: Path, log: Log = print, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Send the operations a run left in its PENDING_FILE (and earlier runs' set aside); returns how many were sent.

    The file is removed when everything went through; otherwise it keeps what is left (in order).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder; give a run folder (what cap train --out wrote)")
    if not (run_dir / STATE_FILE).exists() and not pending_files(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a tracked run folder: it holds no {STATE_FILE} and no "
                                f"{PENDING_FILE} (cap train writes them when tracking.enabled is true)")
    read_json(run_dir / STATE_FILE)  # a corrupt state file is named even when nothing is pending
    sent = 0
    for state_file, pending_file in queues(run_dir):
        if not pending_file.exists():
            continue
        state = read_json(state_file)
        if state is None:
            raise FileNotFoundError(f"{pending_file} has no {state_file.name} next to it: "
                                    f"the tracking URI and run are unknown")
        channel = Channel(run_dir, state, timeout, log, state_file=state_file, pending_file=pending_file,
                          during_training=False)
        sent += channel.flush()
        if not pending_file.exists() and pending_file.name != PENDING_FILE:
            state_file.unlink(missing_ok=True)
    return sent
