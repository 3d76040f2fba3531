"""MLflow tracking of training runs that keeps going when the tracking server goes away.

Every request to the tracking store goes through one place (`_Channel`). When it fails for a reason
that may pass (connection refused, timeout, 5xx, a locked database), the operation is appended to
`<run_dir>/tracking_pending.jsonl` at once, training goes on, and the next call first tries to send
what is pending, in order, with its original step and timestamp. `sync_pending` (the `cap sync`
command) sends what a run left behind. Rejections that cannot pass (a bad value, a missing run) are
not retried forever: they go to `tracking_rejected.jsonl` with the server's answer, and later
operations go on.

Files in a run folder:
  tracking.json            where the run lives: {"uri", "experiment", "experiment_id", "run_id"}
                           (+ "local_id" when the run was opened while the server was away)
  tracking_pending.jsonl   operations not sent yet, one JSON object a line, oldest first
  tracking_rejected.jsonl  operations the store refused, with its answer
  .tracking.lock           serialises a training process and a concurrent `cap sync`

mlflow is imported lazily, so `import cap.tracking` is cheap and NullTracker works without it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cap.tracking.config import TrackingConfig

STATE_FILE = "tracking.json"
PENDING_FILE = "tracking_pending.jsonl"
REJECTED_FILE = "tracking_rejected.jsonl"
LOCK_FILE = ".tracking.lock"

# mlflow's limits (mlflow.utils.validation): longer values are rejected or silently cut by the store.
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 8000
PARAMS_PER_REQUEST = 100

DEFAULT_TIMEOUT = 10.0
LOCAL_ID_PREFIX = "local-"

# Error codes of a store refusing the request itself: sending it again cannot succeed.
_PERMANENT_CODES = frozenset({
    "BAD_REQUEST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
    "NOT_FOUND", "INVALID_STATE",
})

Log = Callable[[str], Any]


def _now_ms() -> int:
    return int(time.time() * 1000)


# ----------------------------------------------------------------------------------------- helpers


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


def _truncate(text: str, limit: int) -> str:
    """Cut `text` to `limit` characters with a note saying so (mlflow would refuse or cut it silently)."""
    if len(text) <= limit:
        return text
    note = f" ...[truncated, {len(text)} chars]"
    return text[: limit - len(note)] + note


def _normalize_uri(uri: str) -> str:
    """Make local store URIs absolute, so `cap sync` from another folder finds the same store."""
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///"):]
        path, sep, query = rest.partition("?")
        if path and path != ":memory:" and not path.startswith("/"):
            return f"sqlite:///{Path(path).resolve()}{sep}{query}"
        return uri
    if uri.split(":")[0] in ("databricks", "databricks-uc", "uc"):
        return uri
    if uri.startswith("file:") or ("://" not in uri and ":" not in uri.split("/")[0]):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        path = url2pathname(urlparse(uri).path) if uri.startswith("file:") else uri
        return Path(path).resolve().as_uri()
    return uri


def resolve_uri(uri: str | None) -> str:
    """The store a run logs to: `uri` made absolute, or the embedded default sqlite:///<cwd>/mlflow.db."""
    return _normalize_uri(uri or f"sqlite:///{Path.cwd()}/mlflow.db")


def _local_artifact_location(uri: str) -> str | None:
    """Artifact folder next to a local store (`<db dir>/mlartifacts`); None for servers.

    Without it mlflow puts the artifacts of a sqlite store under `./mlruns` of whatever folder the
    process happens to run in.
    """
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].partition("?")[0]
        if path and path != ":memory:":
            return str(Path(path).resolve().parent / "mlartifacts")
        return None
    if uri.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return str(Path(url2pathname(urlparse(uri).path)).resolve().parent / "mlartifacts")
    return None


@contextlib.contextmanager
def _http_settings(timeout: float) -> Iterator[None]:
    """mlflow's HTTP settings for our requests only: no retries, no backoff, `timeout` seconds.

    By default mlflow retries 7 times with exponential backoff and waits 120 s for an answer: minutes
    of blocked training per call on a dead server. The pending queue already retries (on the next
    call), so one attempt per call is enough. mlflow reads these variables on every request, so they
    are set around our calls only; values the user set explicitly are left as they are. mlflow parses
    them as integers, hence the ceil.

    Also keeps MlflowClient.set_terminated from writing "View run" links (with emojis) straight to
    sys.stdout before it ends the run: that bypasses `log`, and on a stdout that cannot encode them
    the run would never be ended. `Tracker.finish` logs the link instead.
    """
    ours = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout))),
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }
    added = [name for name in ours if name not in os.environ]
    for name in added:
        os.environ[name] = ours[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


class _Unsendable(Exception):
    """An operation that can never be sent (e.g. its run was never created)."""


def _is_permanent(exc: BaseException) -> bool:
    """True when the store refused the operation itself (sending it again cannot help)."""
    if isinstance(exc, FileNotFoundError | _Unsendable):
        return True
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return False
    return isinstance(exc, MlflowException) and exc.error_code in _PERMANENT_CODES


def _describe(exc: BaseException, timeout: float) -> str:
    """A short reason for a failed request (mlflow's messages run to several hundred characters)."""
    text = str(exc)
    low = text.lower()
    if "connection refused" in low or "failed to establish a new connection" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low:
        return f"no answer within {max(1, math.ceil(timeout))} s"
    if "database is locked" in low:
        return "database is locked"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first if len(first) <= 200 else first[:200] + "..."


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _read_ops(path: Path) -> list[dict]:
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


def _write_ops(path: Path, ops: list[dict]) -> None:
    if not ops:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(op) + "\n" for op in ops))
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
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


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with a local artifact folder for local stores) if missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_local_artifact_location(uri))
        except MlflowException as exc:  # created by another process in between
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise RuntimeError(f"MLflow experiment '{name}' at {uri} is deleted: restore it "
                           f"(`mlflow experiments restore`) or choose another tracking.experiment")
    return exp.experiment_id


# ----------------------------------------------------------------------------------------- channel


class _Channel:
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
        self._client: Any = None
        self.down = False  # inside an outage: warned already, say so when it ends

    @property
    def client(self) -> Any:
        """Made on first use, inside the error handling: opening a sqlite store can fail (locked, unwritable)."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.state["uri"])
        return self._client

    @property
    def uri(self) -> str:
        return self.state["uri"]

    # -- sending

    def send(self, op: dict) -> None:
        """One operation to the store; raises whatever mlflow raises."""
        kind = op["op"]
        with _http_settings(self.timeout):
            if kind == "create_run":
                self._create_run(op)
                return
            run_id = self._run_id()
            client = self.client
            if kind == "metrics":
                from mlflow.entities import Metric

                metrics = [Metric(k, float(v), int(op["timestamp"]), int(op["step"])) for k, v in op["metrics"].items()]
                for i in range(0, len(metrics), 1000):  # mlflow's per-request limit
                    client.log_batch(run_id, metrics=metrics[i:i + 1000])
            elif kind == "params":
                from mlflow.entities import Param

                params = [Param(k, v) for k, v in op["params"].items()]
                for i in range(0, len(params), PARAMS_PER_REQUEST):  # a resend of the same values is fine
                    client.log_batch(run_id, params=params[i:i + PARAMS_PER_REQUEST])
            elif kind == "tags":
                from mlflow.entities import RunTag

                tags = [RunTag(k, v) for k, v in op["tags"].items()]
                for i in range(0, len(tags), PARAMS_PER_REQUEST):
                    client.log_batch(run_id, tags=tags[i:i + PARAMS_PER_REQUEST])
            elif kind == "artifact":
                path = Path(op["path"])
                if not path.exists():
                    raise FileNotFoundError(f"artifact {path} no longer exists")
                if path.is_dir():
                    client.log_artifacts(run_id, str(path), op.get("artifact_path"))
                else:
                    client.log_artifact(run_id, str(path), op.get("artifact_path"))
            elif kind == "resume":
                client.update_run(run_id, status="RUNNING")
            elif kind == "terminate":
                client.set_terminated(run_id, op["status"], end_time=int(op["end_time"]))
            else:
                raise ValueError(f"unknown tracking operation {kind!r}")

    def _run_id(self) -> str:
        if self.state.get("run_id") is None:  # `cap sync` in another process may have created it
            on_disk = _read_json(self.state_file) or {}
            if on_disk.get("local_id") == self.state.get("local_id") and on_disk.get("run_id"):
                self.state.update(run_id=on_disk["run_id"], experiment_id=on_disk.get("experiment_id"))
        if self.state.get("run_id") is None:
            raise _Unsendable(f"{self.pending_file}: the run was never created (its create_run operation is gone)")
        return self.state["run_id"]

    def _create_run(self, op: dict) -> None:
        if self.state.get("run_id"):  # created already; the pending file was not rewritten in time
            return
        experiment_id = ensure_experiment(self.client, op["experiment"], self.uri)
        run = self.client.create_run(experiment_id, start_time=int(op["start_time"]), tags=op.get("tags") or {},
                                     run_name=op.get("run_name"))
        self.state.update(experiment_id=experiment_id, run_id=run.info.run_id)
        _write_json(self.state_file, self.state)  # before the op leaves the queue: no second run on a crash

    # -- queueing

    def submit(self, op: dict) -> None:
        """Send `op` (after what is pending), or keep it on disk; never raises for the store's problems."""
        with _locked(self.run_dir):
            if self.pending_file.exists():
                self._append(op)  # behind what waits, so the order on the server is the order of the calls
                self._flush(current=1)
                return
            try:
                self.send(op)
            except Exception as exc:  # noqa: BLE001 - any failure of the store must not stop training
                if _is_permanent(exc):
                    self._reject(op, exc)
                else:
                    self._append(op)
                    self._went_down(exc)
                return
            if self.down:
                self.down = False
                self.log(f"tracking server {self.uri} is back")

    def flush(self) -> int:
        """Send pending operations in order until one fails; returns how many went through."""
        with _locked(self.run_dir):
            return self._flush()

    def _flush(self, current: int = 0) -> int:
        """`current`: the last op is the caller's own, not counted as pending in the message."""
        ops = _read_ops(self.pending_file)
        sent = 0
        for i, op in enumerate(ops):
            try:
                self.send(op)
            except Exception as exc:  # noqa: BLE001
                if _is_permanent(exc):
                    self._reject(op, exc)
                    _write_ops(self.pending_file, ops[i + 1:])
                    continue
                if i:  # else nothing left the queue: no rewrite on every call of an outage
                    _write_ops(self.pending_file, ops[i:])
                self._went_down(exc)
                return sent
            sent += 1
            _write_ops(self.pending_file, ops[i + 1:])  # progress on disk: a crash resends at most one op
        self.pending_file.unlink(missing_ok=True)
        if ops and (self.down or sent):
            n = max(sent - current, 0)
            self.log(f"tracking server {self.uri} reachable again: sent {n} pending operation"
                     f"{'s' if n != 1 else ''} from {self.pending_file}")
        self.down = False
        return sent

    def _append(self, op: dict) -> None:
        with open(self.pending_file, "a") as fh:  # on disk at once: a run never finished loses nothing
            fh.write(json.dumps(op) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _went_down(self, exc: BaseException) -> None:
        if self.down:
            return  # one warning per outage
        self.down = True
        n = len(_read_ops(self.pending_file))
        ops = f"{n} pending operation{'s' if n != 1 else ''}"
        if self.during_training:
            self.log(f"warning: tracking server {self.uri} unreachable ({_describe(exc, self.timeout)}): training "
                     f"goes on, {ops} kept in {self.pending_file}; they are sent when it is back, "
                     f"or with `cap sync {self.run_dir}`")
        else:
            self.log(f"warning: tracking server {self.uri} unreachable ({_describe(exc, self.timeout)}): "
                     f"{ops} stay in {self.pending_file}; run `cap sync {self.run_dir}` again when it is back")

    def _reject(self, op: dict, exc: BaseException) -> None:
        with open(self.rejected_file, "a") as fh:
            fh.write(json.dumps({**op, "error": str(exc)[:2000]}) + "\n")
        self.log(f"warning: tracking store {self.uri} refused a '{op['op']}' operation "
                 f"({str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}); "
                 f"kept in {self.rejected_file}, later operations go on")


# ----------------------------------------------------------------------------------------- trackers


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


class Tracker:
    """One MLflow run, logged through an MlflowClient (no global state: several may live in one process).

    Never raises because of the store: failed operations wait in the run folder (see the module doc).
    `run_id` is the MLflow run id; for a run opened while the server was away it is a local id
    (`local-...`) until the run could be created, and `open_tracker` accepts either for a resume.
    """

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel
        self._finished = False

    @property
    def run_id(self) -> str:
        state = self._channel.state
        if not state.get("run_id"):
            with contextlib.suppress(_Unsendable):
                self._channel._run_id()  # `cap sync` in another process may have created it meanwhile
        return state.get("run_id") or state["local_id"]

    @property
    def uri(self) -> str:
        return self._channel.uri

    @property
    def pending_file(self) -> Path:
        return self._channel.pending_file

    def log_params(self, params: dict[str, Any]) -> None:
        """Values are stringified and cut to mlflow's 6000 characters (with a note)."""
        if params:
            self._channel.submit({"op": "params",
                                  "params": {str(k): _truncate(str(v), MAX_PARAM_LEN) for k, v in params.items()}})

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
        self._channel.submit({"op": "metrics", "metrics": values, "step": int(step), "timestamp": _now_ms()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (or folder) by absolute path; it is read when sent, so keep it in place until then."""
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        self._channel.submit({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            self._channel.submit({"op": "tags",
                                  "tags": {str(k): _truncate(str(v), MAX_TAG_LEN) for k, v in tags.items()}})

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED) after a last attempt to send what is pending."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"finish: status {status!r}, expected FINISHED, FAILED or KILLED")
        if self._finished:
            return
        self._finished = True
        self._channel.submit({"op": "terminate", "status": status, "end_time": _now_ms()})
        n = len(_read_ops(self._channel.pending_file))
        state = self._channel.state
        if not n and self.uri.startswith(("http://", "https://")) and state.get("experiment_id"):
            self._channel.log(f"MLflow run {state['run_id']} ended {status}: {self.uri.rstrip('/')}/#/experiments/"
                              f"{state['experiment_id']}/runs/{state['run_id']}")
        if n:
            self._channel.log(f"warning: {n} tracking operation{'s' if n != 1 else ''} (including the end of the "
                              f"run) could not be sent to {self.uri}; they are kept in {self._channel.pending_file}: "
                              f"send them with `cap sync {self._channel.run_dir}` once the server is back")


def _set_aside(run_dir: Path, state: dict, log: Log) -> None:
    """Keep another run's unsent operations under names `sync_pending` still finds."""
    tag = state.get("run_id") or state.get("local_id") or f"unknown-{uuid.uuid4().hex[:8]}"
    pending = run_dir / f"tracking_pending.{tag}.jsonl"
    os.replace(run_dir / PENDING_FILE, pending)
    _write_json(run_dir / f"tracking.{tag}.json", state)
    log(f"warning: {run_dir} holds unsent operations of an earlier MLflow run ({tag}); moved to {pending}, "
        f"send them with `cap sync {run_dir}`")


def open_tracker(cfg: TrackingConfig, run_dir: Path, resume_run_id: str | None = None,
                 log: Log = print) -> Tracker | NullTracker:
    """Open (or, with `resume_run_id`, continue) the MLflow run of `run_dir`; writes run_dir/tracking.json.

    If the server cannot be reached the run is opened locally and created when it is back. A store
    that refuses outright (deleted experiment, unknown run to resume) raises RuntimeError: that is a
    configuration problem to fix before training, not an outage.
    """
    if not cfg.enabled:
        return NullTracker()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = resolve_uri(cfg.uri)
    old = _read_json(run_dir / STATE_FILE)
    with _locked(run_dir):
        if resume_run_id and old and resume_run_id in (old.get("run_id"), old.get("local_id")):
            state = old  # our own run: what is pending belongs to it and is sent first
        else:
            if old and (run_dir / PENDING_FILE).exists():
                _set_aside(run_dir, old, log)
            state = {"uri": uri, "experiment": cfg.experiment, "experiment_id": None, "run_id": resume_run_id}
    channel = _Channel(run_dir, state, cfg.timeout, log)
    tracker = Tracker(channel)

    if resume_run_id:
        _write_json(channel.state_file, state)
        op = {"op": "resume", "time": _now_ms()}
        if channel.pending_file.exists():
            channel.submit(op)  # behind what is pending, in order
        else:
            try:
                channel.send(op)
            except Exception as exc:  # noqa: BLE001
                if _is_permanent(exc):
                    raise RuntimeError(f"cannot continue MLflow run {resume_run_id} at {uri}: {exc}") from exc
                with _locked(run_dir):
                    channel._append(op)
                channel._went_down(exc)
        if state.get("run_id") and not state.get("experiment_id"):
            with contextlib.suppress(Exception), _http_settings(cfg.timeout):
                state["experiment_id"] = channel.client.get_run(state["run_id"]).info.experiment_id
                _write_json(channel.state_file, state)
        return tracker

    op = {"op": "create_run", "experiment": cfg.experiment, "run_name": cfg.run_name or run_dir.resolve().name,
          "start_time": _now_ms(), "tags": {"cap.run_dir": str(run_dir.resolve()),
                                            **({"mlflow.parentRunId": cfg.parent_run_id} if cfg.parent_run_id
                                               else {})}}
    try:
        channel.send(op)  # writes tracking.json with the run id
    except RuntimeError:
        raise
    except Exception as exc:  # noqa: BLE001
        if _is_permanent(exc):
            raise RuntimeError(f"cannot open an MLflow run in experiment '{cfg.experiment}' at {uri}: {exc}") from exc
        state["local_id"] = LOCAL_ID_PREFIX + uuid.uuid4().hex
        _write_json(channel.state_file, state)
        with _locked(run_dir):
            channel._append(op)
        channel._went_down(exc)
    return tracker


def _queues(run_dir: Path) -> list[tuple[Path, Path]]:
    """(state file, pending file) pairs of a run folder: earlier runs set aside (oldest first), then its own."""
    pairs = []
    for pending in sorted(run_dir.glob("tracking_pending.*.jsonl"), key=lambda p: p.stat().st_mtime):
        tag = pending.name[len("tracking_pending."):-len(".jsonl")]
        pairs.append((run_dir / f"tracking.{tag}.json", pending))
    return pairs + [(run_dir / STATE_FILE, run_dir / PENDING_FILE)]


def sync_pending(run_dir: Path, log: Log = print, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Send the operations a run left in run_dir/tracking_pending.jsonl; returns how many were sent.

    The file is removed when everything went through; otherwise it keeps what is left (in order).
    """
    run_dir = Path(run_dir)
    sent = 0
    for state_file, pending_file in _queues(run_dir):
        if not pending_file.exists():
            continue
        state = _read_json(state_file)
        if state is None:
            raise FileNotFoundError(f"{pending_file} has no {state_file.name} next to it: "
                                    f"the tracking URI and run are unknown")
        channel = _Channel(run_dir, state, timeout, log, state_file=state_file, pending_file=pending_file,
                           during_training=False)
        sent += channel.flush()
        if not pending_file.exists() and pending_file.name != PENDING_FILE:
            state_file.unlink(missing_ok=True)
    return sent
