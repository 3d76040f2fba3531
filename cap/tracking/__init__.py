"""MLflow tracking of training runs that keeps going when the tracking server goes away.

Every request to the tracking store goes through one place (`store.Store`). A training run's
requests go through its channel: when one fails for a reason that may pass (connection refused,
timeout, 5xx, a locked database), the operation is appended to `<run_dir>/tracking_pending.jsonl`
at once, training goes on, and the next call first tries to send what is pending, in order, with
its original step and timestamp. `sync_pending` (the `cap sync` command) sends what a run left
behind. Rejections that cannot pass (a bad value, a missing run) are not retried forever: they go
to `tracking_rejected.jsonl` with the server's answer, and later operations go on. The files of a
run folder are described in cap.tracking.queue.

Modules:
  uri      tracking URIs: local stores made absolute, the default store, local artifact folders
  queue    the run folder's tracking files: state, the durable queue of pending operations, the lock
  store    `Store`, the requests to mlflow (one attempt, a timeout, values cut to mlflow's limits),
           and which failures are permanent
  channel  one run's operations: sent, or queued while the store is away, and flushed in order
  tracker  `Tracker`, `NullTracker`, `open_tracker`, `sync_pending`
  config   `TrackingConfig` (`tracking.*` in a run's config)

mlflow is imported lazily, so `import cap.tracking` is cheap and NullTracker works without it.
"""

from cap.tracking.queue import (
    LOCK_FILE,
    PENDING_FILE,
    REJECTED_FILE,
    STATE_FILE,
    TrackingFileError,
    pending_files,
    recorded_run_id,
    retire_state,
    run_state,
)
from cap.tracking.store import (
    DEFAULT_TIMEOUT,
    MAX_PARAM_LEN,
    MAX_TAG_LEN,
    Store,
    ensure_experiment,
    http_settings,
    is_permanent,
    param_values,
    tag_values,
    truncate,
)
from cap.tracking.tracker import LOCAL_ID_PREFIX, NullTracker, Tracker, flatten, open_tracker, sync_pending
from cap.tracking.uri import resolve_uri

__all__ = [
    "DEFAULT_TIMEOUT", "LOCAL_ID_PREFIX", "LOCK_FILE", "MAX_PARAM_LEN", "MAX_TAG_LEN", "PENDING_FILE", "REJECTED_FILE",
    "STATE_FILE", "NullTracker", "Store", "Tracker", "TrackingFileError", "ensure_experiment", "flatten",
    "http_settings", "is_permanent",
    "open_tracker", "param_values", "pending_files", "recorded_run_id", "resolve_uri", "retire_state", "run_state",
    "sync_pending", "tag_values", "truncate",
]
