"""Where a run is tracked (`tracking.*` in a run's config)."""

from __future__ import annotations

from dataclasses import dataclass

from cap.tracking.store import DEFAULT_TIMEOUT


@dataclass
class TrackingConfig:
    enabled: bool = True
    """log the run to MLflow (rank 0 only)"""
    uri: str | None = None
    """MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else the embedded store sqlite:///<working dir>/mlflow.db"""
    experiment: str = "cap"
    run_name: str | None = None
    """MLflow run name (default: the run folder's name)"""
    timeout: float = DEFAULT_TIMEOUT
    """seconds a request to a tracking server may take before the run goes on without it"""
    parent_run_id: str | None = None
    """nest the run under this MLflow run (a sweep's parent run; `cap sweep` sets it for its trials)"""
