"""`cap train` tracked in MLflow for real: an embedded sqlite store, and a real `mlflow server` that is killed
in the middle of a run (training goes on; `cap sync` delivers everything once the server is back)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
EPOCH_METRICS = ["train_loss", "train_acc", "test_loss", "test_acc", "mac_ratio", "param_ratio", "layers_kept",
                 "units_kept", "theta_undecided", "theta_locked", "epoch_seconds"]
ARTIFACTS = {"config.yaml", "summary.json", "history.json", "model.pt", "plots/structure.png", "plots/thetas.png"}


def cap_train(out: Path, uri: str, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cap", "train", "--config", "configs/smoke.yaml", "--out", str(out),
            f"train.epochs={epochs}", "train.progress=false", f"tracking.uri={uri}", "tracking.experiment=cap-test",
            "tracking.timeout=3", *extra]


def artifact_names(client, run_id: str, path: str | None = None) -> set[str]:
    names = set()
    for item in client.list_artifacts(run_id, path):
        names |= artifact_names(client, run_id, item.path) if item.is_dir else {item.path}
    return names


def check_run(client, out: Path) -> None:
    """The MLflow run holds the resolved config, every epoch's figures exactly as history.json, the artifacts."""
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "history.json").read_text())
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["prune.tau"] == "0.8" and params["prune.alpha"] == "0.5" and params["prune.beta"] == "0.5"
    assert params["model.name"] == "resnet20" and params["data.batch_size"] == "64" and params["world_size"] == "1"
    for key in EPOCH_METRICS:
        logged = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in sorted(logged, key=lambda m: m.step)] == [h["epoch"] for h in history], key
        assert [m.value for m in sorted(logged, key=lambda m: m.step)] == [float(h[key]) for h in history], key
    assert ARTIFACTS <= artifact_names(client, run.info.run_id)
    note = run.data.tags["mlflow.note.content"]  # the run's description in the UI: its result in one line
    assert f"test_acc {summary['test_acc']:.4f}" in note, note
    assert f"blocks {summary['layers_kept']}/{summary['layers_total']}" in note, note


def test_cap_train_logs_to_an_embedded_sqlite_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run(cap_train(tmp_path / "run", uri, 2), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    check_run(MlflowClient(uri), tmp_path / "run")
    assert f"cap ui --experiment cap-test --tracking-uri {uri}" in done.stdout, done.stdout[-2000:]
    assert (tmp_path / "mlartifacts").is_dir(), "artifacts belong beside the database, not in the working dir"


def test_server_killed_mid_run_loses_nothing(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    with MlflowServer(tmp_path / "server") as server:
        proc = subprocess.Popen(cap_train(out, server.uri, 3, "data.train_subset=1500"), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("epoch 1/3"):
                server.kill()  # the tracking server dies; training must not
                break
        lines.append(proc.communicate(timeout=600)[0])
        log = "".join(lines)
        assert proc.returncode == 0, log
        assert "unreachable" in log and "cap sync" in log, log
        assert f"the runs in the MLflow UI: {server.uri}/#/experiments/" in log, log  # a server: the link itself
        pending = out / "tracking_pending.jsonl"
        assert pending.is_file() and pending.read_text().strip()

        early = subprocess.run([sys.executable, "-m", "cap", "sync", str(out)], cwd=ROOT, capture_output=True,
                               text=True, timeout=300)
        assert early.returncode == 1 and "still hold operations" in early.stderr, early.stdout + early.stderr
        assert pending.is_file(), "a failed sync must keep what is pending"

        server.start()
        done = subprocess.run([sys.executable, "-m", "cap", "sync", str(out)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert not pending.exists()
        check_run(MlflowClient(server.uri), out)
