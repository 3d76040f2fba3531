"""Requests to an MLflow tracking store: the one place that talks to mlflow.

`Store` makes every request with the same HTTP settings (one attempt, `timeout` seconds) and cuts
values to mlflow's limits the same way, for the trackers' queued operations (cap.tracking.channel)
and for direct calls (the sweep driver, `cap pareto`). It raises whatever mlflow raises;
`is_permanent` tells a refusal that cannot pass from an outage that may.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cap.tracking.uri import local_artifact_location

DEFAULT_TIMEOUT = 10.0
"""seconds a request may take (tracking.timeout's default)"""

# mlflow's limits (mlflow.utils.validation): longer values are rejected or silently cut by the store.
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 8000
PARAMS_PER_REQUEST = 100
METRICS_PER_REQUEST = 1000

# Error codes of a store refusing the request itself: sending it again cannot succeed.
PERMANENT_CODES = frozenset({
    "BAD_REQUEST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
    "NOT_FOUND", "INVALID_STATE",
})


def now_ms() -> int:
    return int(time.time() * 1000)


def truncate(text: str, limit: int) -> str:
    """Cut `text` to `limit` characters with a note saying so (mlflow would refuse or cut it silently)."""
    if len(text) <= limit:
        return text
    note = f" ...[truncated, {len(text)} chars]"
    return text[: limit - len(note)] + note


def param_values(params: dict[str, Any]) -> dict[str, str]:
    """Params as mlflow stores them: keys and values stringified, values cut to MAX_PARAM_LEN."""
    return {str(k): truncate(str(v), MAX_PARAM_LEN) for k, v in params.items()}


def tag_values(tags: dict[str, Any]) -> dict[str, str]:
    """Tags as mlflow stores them: keys and values stringified, values cut to MAX_TAG_LEN."""
    return {str(k): truncate(str(v), MAX_TAG_LEN) for k, v in tags.items()}


@contextlib.contextmanager
def http_settings(timeout: float) -> Iterator[None]:
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


class Unsendable(Exception):
    """An operation that can never be sent (e.g. its run was never created)."""


def is_permanent(exc: BaseException) -> bool:
    """True when the store refused the operation itself (sending it again cannot help)."""
    if isinstance(exc, FileNotFoundError | Unsendable):
        return True
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return False
    return isinstance(exc, MlflowException) and exc.error_code in PERMANENT_CODES


def describe(exc: BaseException, timeout: float) -> str:
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


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with a local artifact folder for local stores) if missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=local_artifact_location(uri))
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


class Store:
    """One MLflow tracking store (an MlflowClient, made on first use: opening a sqlite store can fail).

    Every method is one request (or a few, where mlflow limits a request's size) made inside
    `http_settings(timeout)`, and raises what mlflow raises.
    """

    def __init__(self, uri: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.uri = uri
        self.timeout = timeout
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    # -- experiments and runs

    def find_experiment(self, name: str) -> str | None:
        """The id of experiment `name`; None if there is none."""
        with http_settings(self.timeout):
            exp = self.client.get_experiment_by_name(name)
        return None if exp is None else exp.experiment_id

    def experiment(self, name: str | None) -> Any:
        """mlflow's Experiment `name`, or with None the one updated last that holds runs; None if there is none."""
        from mlflow.entities import ViewType

        with http_settings(self.timeout):
            if name is not None:
                return self.client.get_experiment_by_name(name)
            for exp in self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY,
                                                      order_by=["last_update_time DESC"]):
                if self.client.search_runs([exp.experiment_id], max_results=1):
                    return exp
        return None

    def newest_run(self, experiment_id: str, filter_string: str) -> Any:
        """The run of the experiment that matches `filter_string` and started last; None if there is none."""
        with http_settings(self.timeout):
            runs = self.client.search_runs([experiment_id], filter_string=filter_string, max_results=1,
                                           order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def create_run(self, experiment: str, run_name: str | None, tags: dict[str, str],
                   start_time: int | None = None) -> tuple[str, str]:
        """A new run in experiment `experiment` (created if missing); returns (experiment id, run id)."""
        with http_settings(self.timeout):
            experiment_id = ensure_experiment(self.client, experiment, self.uri)
            run = self.client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name)
        return experiment_id, run.info.run_id

    def run_info(self, run_id: str) -> Any:
        """mlflow's RunInfo of the run (status, experiment_id, ...)."""
        with http_settings(self.timeout):
            return self.client.get_run(run_id).info

    def reopen(self, run_id: str) -> None:
        """Mark the run RUNNING again (a resumed run)."""
        with http_settings(self.timeout):
            self.client.update_run(run_id, status="RUNNING")

    def terminate(self, run_id: str, status: str, end_time: int | None = None) -> None:
        """End the run: FINISHED, FAILED or KILLED."""
        with http_settings(self.timeout):
            self.client.set_terminated(run_id, status, end_time=end_time)

    def search_runs(self, experiment_id: str, filter_string: str = "") -> list[Any]:
        """Every run of the experiment that matches `filter_string` (all pages)."""
        runs, token = [], None
        with http_settings(self.timeout):
            while True:
                page = self.client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                               page_token=token)
                runs.extend(page)
                token = page.token
                if not token:
                    return runs

    # -- logging

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Params cut like `param_values`, in batches of mlflow's size (a resend of the same values is fine)."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in param_values(params).items()]
        with http_settings(self.timeout):
            for i in range(0, len(items), PARAMS_PER_REQUEST):
                self.client.log_batch(run_id, params=items[i:i + PARAMS_PER_REQUEST])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Tags cut like `tag_values`, in batches of mlflow's size."""
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tag_values(tags).items()]
        with http_settings(self.timeout):
            for i in range(0, len(items), PARAMS_PER_REQUEST):
                self.client.log_batch(run_id, tags=items[i:i + PARAMS_PER_REQUEST])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0, timestamp: int | None = None) -> None:
        """Metrics of one step (timestamp: ms since the epoch, default now), in batches of mlflow's size."""
        from mlflow.entities import Metric

        timestamp = now_ms() if timestamp is None else int(timestamp)
        items = [Metric(k, float(v), timestamp, int(step)) for k, v in metrics.items()]
        with http_settings(self.timeout):
            for i in range(0, len(items), METRICS_PER_REQUEST):
                self.client.log_batch(run_id, metrics=items[i:i + METRICS_PER_REQUEST])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents, under `artifact_path` of the run's artifacts."""
        with http_settings(self.timeout):
            if Path(path).is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(run_id, str(path), artifact_path)
