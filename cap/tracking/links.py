"""Links into the MLflow UI that open cap's views directly, and the one-line result a run's description holds.

What a link can carry (MLflow 3.17's experiment page reads these from the URL): `workflowType`, and the
search facets `searchFilter`, `orderByKey`, `orderByAsc`, `startTime`, `lifecycleFilter`,
`modelVersionFilter`, `datasetsFilter`. Without `workflowType=machine_learning` a fresh browser opens an
experiment in the GenAI view, whatever the experiment's `mlflow.experimentKind` tag says (the UI takes the
kind from its GenAI / Model training switch, kept in the browser's storage). Sorted by a metric, the table lists
nested runs (a sweep's trials) flat. Which columns it shows is kept only in the browser's storage too;
docs/tracking.md has the clicks.
"""

from __future__ import annotations

import shlex
from urllib.parse import quote, urlencode

from cap.tracking.uri import default_uri, is_server

NOTE_TAG = "mlflow.note.content"
"""a run's description in the MLflow UI"""
COMPARISON_FILTER = "tags.`cap.kind` = 'comparison'"
FRONT_FILTER = "tags.pareto = 'true'"
SORT_KEY = "metrics.`test_acc`"


def runs_link(base_url: str, experiment_id: str, filter_string: str = "") -> str:
    """The experiment's runs table in model-training mode, best test accuracy first, optionally filtered."""
    query = {"workflowType": "machine_learning", "orderByKey": SORT_KEY, "orderByAsc": "false"}
    if filter_string:
        query["searchFilter"] = filter_string
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"


def run_link(base_url: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    """One run's page (`tab`: "" for its overview, "artifacts" for its files)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else "")


def result_note(summary: dict) -> str:
    """A run's result in one line, for its MLflow description."""
    return (f"test_acc {summary['test_acc']:.4f} · MAC cut {1 - summary['mac_ratio']:.1%} · param cut "
            f"{1 - summary['param_ratio']:.1%} · blocks {summary['layers_kept']}/{summary['layers_total']} · "
            f"units {summary['units_kept']}/{summary['units_total']}")


def ui_hint(uri: str, experiment: str, experiment_id: str | None = None) -> str:
    """Where to see `experiment` of the store at `uri`: the runs link on a server whose experiment id is known,
    else the `cap ui` command (with --tracking-uri where the store is not this folder's default)."""
    if is_server(uri) and experiment_id:
        return f"the runs in the MLflow UI: {runs_link(uri, experiment_id)}"
    where = "" if uri == default_uri() else f" --tracking-uri {shlex.quote(uri)}"
    return f"to see the runs in the MLflow UI: cap ui --experiment {shlex.quote(experiment)}{where}"
