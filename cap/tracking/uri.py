"""Tracking URIs: local stores made absolute, the default store, and where a local store keeps artifacts."""

from __future__ import annotations

import os
from pathlib import Path

_SQLITE = "sqlite:///"


def _file_uri_path(uri: str) -> Path:
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    return Path(url2pathname(urlparse(uri).path))


def normalize_uri(uri: str) -> str:
    """Make local store URIs absolute, so `cap sync` from another folder finds the same store."""
    if uri.startswith(_SQLITE):
        rest = uri[len(_SQLITE):]
        path, sep, query = rest.partition("?")
        if path and path != ":memory:" and not path.startswith("/"):
            return f"{_SQLITE}{Path(path).resolve()}{sep}{query}"
        return uri
    if uri.split(":")[0] in ("databricks", "databricks-uc", "uc"):
        return uri
    if uri.startswith("file:") or ("://" not in uri and ":" not in uri.split("/")[0]):
        path = _file_uri_path(uri) if uri.startswith("file:") else Path(uri)
        return path.resolve().as_uri()
    return uri


def default_uri() -> str:
    """The embedded store of the working folder, sqlite:///<cwd>/mlflow.db."""
    return f"{_SQLITE}{Path.cwd()}/mlflow.db"


def resolve_uri(uri: str | None) -> str:
    """The store a run logs to, made absolute: `uri`, else $MLFLOW_TRACKING_URI (as every MLflow tool reads it),
    else the embedded default."""
    return normalize_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri())


def is_server(uri: str) -> bool:
    """A tracking server (http/https), as opposed to a store on this machine's disk."""
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite store; None for any other store."""
    if not uri.startswith(_SQLITE):
        return None
    path = uri[len(_SQLITE):].partition("?")[0]
    return Path(path) if path and path != ":memory:" else None


def local_artifact_location(uri: str) -> str | None:
    """Artifact folder next to a local store (`<db dir>/mlartifacts`); None for servers.

    Without it mlflow puts the artifacts of a sqlite store under `./mlruns` of whatever folder the
    process happens to run in.
    """
    if uri.startswith(_SQLITE):
        path = sqlite_path(uri)
        return None if path is None else str(path.resolve().parent / "mlartifacts")
    if uri.startswith("file:"):
        return str(_file_uri_path(uri).resolve().parent / "mlartifacts")
    return None
