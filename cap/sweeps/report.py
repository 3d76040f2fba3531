"""`cap pareto`: the non-dominated runs of an MLflow experiment (or of one sweep), as files and MLflow tags.

Objectives, all maximised: test accuracy, MAC reduction, parameter reduction (fractions of the dense
network). Three fronts: accuracy x MAC reduction, accuracy x parameter reduction (2-D), and all three
(3-D). Each front's hypervolume above the origin is one number to compare sweeps or methods by.

Writes pareto.csv (every run, its values and front memberships), pareto.png (matplotlib, fronts
highlighted, points labelled with tau/alpha/beta), pareto.html (plotly, interactive, self-contained)
and pareto.json (hypervolumes). Tags every run it read: pareto=true/false for the 3-D front, plus
pareto_acc_mac and pareto_acc_param, so the MLflow UI filters with `tags.pareto = 'true'`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cap.engine.console import console
from cap.sweeps import SUPERSEDED_TAG, SWEEP_TAG
from cap.sweeps.pareto import hypervolume_2d, hypervolume_3d, non_dominated
from cap.tracking import Store, resolve_uri
from cap.tracking.store import describe

Log = Callable[[str], Any]

FRONTS: dict[str, tuple[str, ...]] = {
    "acc_mac": ("test_acc", "mac_reduction"),
    "acc_param": ("test_acc", "param_reduction"),
    "acc_mac_param": ("test_acc", "mac_reduction", "param_reduction"),
}
TAG_OF_FRONT = {"acc_mac": "pareto_acc_mac", "acc_param": "pareto_acc_param", "acc_mac_param": "pareto"}
LABELS = {"test_acc": "test accuracy", "mac_reduction": "MAC reduction", "param_reduction": "parameter reduction"}


class ParetoError(RuntimeError):
    """Nothing to compute: unknown experiment, no finished runs with the final metrics."""


@dataclass
class RunPoint:
    run_id: str
    name: str
    tau: float | None
    alpha: float | None
    beta: float | None
    test_acc: float
    mac_reduction: float
    param_reduction: float

    def label(self) -> str:
        parts = [f"{k}={v:.3g}" for k, v in (("τ", self.tau), ("α", self.alpha), ("β", self.beta)) if v is not None]
        return " ".join(parts) or self.name

    def values(self, keys: tuple[str, ...]) -> tuple[float, ...]:
        return tuple(getattr(self, k) for k in keys)


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def fetch_runs(store: Store, experiment: str, parent: str | None = None) -> list[RunPoint]:
    """Finished training runs with final metrics (sweep parents and superseded attempts left out)."""
    experiment_id = store.find_experiment(experiment)
    if experiment_id is None:
        raise ParetoError(f"MLflow experiment '{experiment}' does not exist at {store.uri}")
    query = "attributes.status = 'FINISHED'"
    if parent:
        query += f" and tags.mlflow.parentRunId = '{parent}'"
    points = []
    for run in store.search_runs(experiment_id, query):
        m, p, tags = run.data.metrics, run.data.params, run.data.tags
        if SWEEP_TAG in tags or tags.get(SUPERSEDED_TAG) == "true":
            continue
        if not all(k in m for k in ("final_test_acc", "mac_reduction", "param_reduction")):
            continue
        trade_offs = (_float(p.get(f"prune.{k}")) for k in ("tau", "alpha", "beta"))
        points.append(RunPoint(run.info.run_id, run.info.run_name or run.info.run_id, *trade_offs,
                               m["final_test_acc"], m["mac_reduction"], m["param_reduction"]))
    return sorted(points, key=lambda r: r.run_id)


def compute_fronts(points: list[RunPoint]) -> tuple[dict[str, set[int]], dict[str, float]]:
    """Front members (indices into points) and hypervolume (reference: the origin) of each front."""
    members, volumes = {}, {}
    for name, keys in FRONTS.items():
        values = [p.values(keys) for p in points]
        members[name] = set(non_dominated(values))
        front = [values[i] for i in members[name]]
        volumes[name] = hypervolume_2d(front) if len(keys) == 2 else hypervolume_3d(front)
    return members, volumes


def write_csv(points: list[RunPoint], members: dict[str, set[int]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "run_name", "tau", "alpha", "beta", "test_acc", "mac_reduction", "param_reduction",
                         *(f"front_{name}" for name in FRONTS)])
        for i, p in enumerate(points):
            writer.writerow([p.run_id, p.name, p.tau, p.alpha, p.beta, p.test_acc, p.mac_reduction,
                             p.param_reduction, *(i in members[name] for name in FRONTS)])


def plot_png(points: list[RunPoint], members: dict[str, set[int]], volumes: dict[str, float], path: Path,
             title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), constrained_layout=True)
    for ax, name in zip(axes, ("acc_mac", "acc_param"), strict=True):
        y_key, x_key = FRONTS[name]
        on = sorted(members[name], key=lambda i: getattr(points[i], x_key))
        off = [i for i in range(len(points)) if i not in members[name]]
        ax.scatter([getattr(points[i], x_key) for i in off], [getattr(points[i], y_key) for i in off],
                   c="0.6", s=25, label="dominated")
        xs, ys = [getattr(points[i], x_key) for i in on], [getattr(points[i], y_key) for i in on]
        ax.step(xs, ys, where="post", c="tab:red", lw=1, alpha=0.6)
        ax.scatter(xs, ys, c="tab:red", s=45, zorder=3, label=f"front (hypervolume {volumes[name]:.4f})")
        for i, p in enumerate(points):
            ax.annotate(p.label(), (getattr(p, x_key), getattr(p, y_key)), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", color="tab:red" if i in members[name] else "0.4")
        ax.set_xlabel(LABELS[x_key])
        ax.set_ylabel(LABELS[y_key])
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{title}: {len(points)} runs, 3-D front {len(members['acc_mac_param'])} runs "
                 f"(hypervolume {volumes['acc_mac_param']:.4f})")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_html(points: list[RunPoint], members: dict[str, set[int]], path: Path, title: str) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, specs=[[{"type": "xy"}, {"type": "xy"}, {"type": "scene"}]],
                        subplot_titles=("accuracy vs MAC reduction", "accuracy vs parameter reduction",
                                        "all three (3-D front in red)"))
    hover = [f"{p.name}<br>{p.label()}<br>acc {p.test_acc:.4f}<br>MACs -{p.mac_reduction:.1%}<br>"
             f"params -{p.param_reduction:.1%}" for p in points]

    def colours(name: str) -> list[str]:
        return ["crimson" if i in members[name] else "grey" for i in range(len(points))]

    for col, name in ((1, "acc_mac"), (2, "acc_param")):
        y_key, x_key = FRONTS[name]
        fig.add_trace(go.Scatter(x=[getattr(p, x_key) for p in points], y=[getattr(p, y_key) for p in points],
                                 mode="markers", marker={"color": colours(name), "size": 9}, text=hover,
                                 hoverinfo="text", showlegend=False), row=1, col=col)
        fig.update_xaxes(title_text=LABELS[x_key], row=1, col=col)
        fig.update_yaxes(title_text=LABELS[y_key], row=1, col=col)
    fig.add_trace(go.Scatter3d(x=[p.mac_reduction for p in points], y=[p.param_reduction for p in points],
                               z=[p.test_acc for p in points], mode="markers", text=hover, hoverinfo="text",
                               marker={"color": colours("acc_mac_param"), "size": 5}, showlegend=False),
                  row=1, col=3)
    fig.update_scenes(xaxis_title="MAC reduction", yaxis_title="param reduction", zaxis_title="accuracy")
    fig.update_layout(title=title, height=560, width=1500)
    fig.write_html(path, include_plotlyjs=True)  # self-contained: opens without network access


def tag_runs(store: Store, points: list[RunPoint], members: dict[str, set[int]]) -> None:
    for i, p in enumerate(points):
        store.set_tags(p.run_id, {TAG_OF_FRONT[name]: str(i in members[name]).lower() for name in FRONTS})


def pareto_report(uri: str | None, experiment: str, parent: str | None, out_dir: Path,
                  log: Log = console) -> dict[str, Any]:
    """Read the runs, write the files, tag the runs, log the files and hypervolumes on `parent`."""
    uri = resolve_uri(uri)
    store = Store(uri)
    try:
        points = fetch_runs(store, experiment, parent)
    except ParetoError:
        raise
    except Exception as exc:  # noqa: BLE001 - mlflow raises many kinds for a store it cannot reach or read
        raise ParetoError(f"MLflow tracking store {uri} cannot be read ({describe(exc, store.timeout)}); start the "
                          "server, or give the URI of a running one with --tracking-uri") from exc
    if not points:
        raise ParetoError(f"no finished runs with final_test_acc/mac_reduction/param_reduction in experiment "
                          f"'{experiment}'" + (f" under parent run {parent}" if parent else "") + f" at {uri}")
    members, volumes = compute_fronts(points)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{experiment}" + (f" / sweep {parent[:8]}" if parent else "")
    write_csv(points, members, out_dir / "pareto.csv")
    plot_png(points, members, volumes, out_dir / "pareto.png", title)
    plot_html(points, members, out_dir / "pareto.html", title)
    summary = {"experiment": experiment, "parent_run_id": parent, "runs": len(points),
               "front_sizes": {name: len(m) for name, m in members.items()},
               "hypervolume": volumes, "reference_point": "origin (accuracy 0, reductions 0)",
               "front_runs": sorted(points[i].run_id for i in members["acc_mac_param"])}
    (out_dir / "pareto.json").write_text(json.dumps(summary, indent=2))
    tag_runs(store, points, members)
    if parent:
        for name in ("pareto.csv", "pareto.png", "pareto.html", "pareto.json"):
            store.log_artifact(parent, out_dir / name, "pareto")
        store.log_metrics(parent, {f"hypervolume_{name}": value for name, value in volumes.items()})
    log(f"{len(points)} runs; fronts: " + ", ".join(f"{name} {len(members[name])} runs (hypervolume "
                                                   f"{volumes[name]:.4f})" for name in FRONTS))
    for i in sorted(members["acc_mac_param"], key=lambda i: -points[i].test_acc):
        p = points[i]
        log(f"  front: {p.name} {p.label()} acc {p.test_acc:.4f} MACs -{p.mac_reduction:.1%} "
            f"params -{p.param_reduction:.1%}")
    log(f"wrote {out_dir}/pareto.csv, pareto.png, pareto.html, pareto.json")
    return summary
