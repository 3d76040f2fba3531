"""Tracking URIs: local stores made absolute, the default store, and where a local store keeps artifacts."""

from __future__ import annotations

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


def resolve_uri(uri: str | None) -> str:
    """The store a run logs to: `uri` made absolute, or the embedded default sqlite:///<cwd>/mlflow.db."""
    return normalize_uri(uri or f"{_SQLITE}{Path.cwd()}/mlflow.db")


def local_artifact_location(uri: str) -> str | None:
    """Artifact folder next to a local store (`<db dir>/mlartifacts`); None for servers.

    Without it mlflow puts the artifacts of a sqlite store under `./mlruns` of whatever folder the
    process happens to run in.
    """
    if uri.startswith(_SQLITE):
        path = uri[len(_SQLITE):].partition("?")[0]
        if path and path != ":memory:":
            return str(Path(path).resolve().parent / "mlartifacts")
        return None
    if uri.startswith("file:"):
        return str(_file_uri_path(uri).resolve().parent / "mlartifacts")
    return None
