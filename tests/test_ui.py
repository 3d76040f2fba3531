"""`cap ui`: the MLflow UI on cap's store, bound to loopback, with links that open cap's views (checked in a
headless browser with a fresh profile), Ctrl-C that stops it, and a remote server for which nothing starts."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cap.tracking.links import run_link, runs_link, ui_hint
from cap.tracking.uri import default_uri, resolve_uri
from tests.mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
TRIALS = {"trial-a": (0.81, True), "trial-b": (0.86, True), "trial-c": (0.79, False)}  # test_acc, on the front


def cap_ui(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cap", "ui", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, **kwargs)


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    raw = bytes.fromhex(address)  # four little-endian 32-bit words
                    found.add(socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    return found


# ---------------------------------------------------------------------------- links and URIs
def test_links_carry_the_model_training_view_the_sort_and_the_filter():
    link = runs_link("http://127.0.0.1:5000/", "7", "tags.pareto = 'true'")
    assert link.startswith("http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning&")
    assert "orderByKey=metrics.%60test_acc%60&orderByAsc=false" in link
    assert link.endswith("searchFilter=tags.pareto%20%3D%20%27true%27")
    assert run_link("http://h:1", "7", "abc", "artifacts") == "http://h:1/#/experiments/7/runs/abc/artifacts"


def test_the_hint_names_the_store_unless_it_is_this_folders(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert ui_hint(default_uri(), "cap").endswith("cap ui --experiment cap")
    assert ui_hint("sqlite:////x/y.db", "my runs").endswith("cap ui --experiment 'my runs' --tracking-uri sqlite:////x/y.db")
    assert ui_hint("http://h:5000", "cap", "3").endswith(runs_link("http://h:5000", "3"))
    assert ui_hint("http://h:5000", "cap").endswith("cap ui --experiment cap --tracking-uri http://h:5000")


def test_the_store_is_the_flag_then_mlflow_tracking_uri_then_this_folders(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_uri(None) == "http://tracking.example:5000"
    assert resolve_uri("sqlite:///runs.db") == f"sqlite:///{tmp_path}/runs.db"


def test_bad_input_is_one_line(tmp_path):
    missing = cap_ui("--tracking-uri", f"sqlite:///{tmp_path}/none.db")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "no MLflow store at" in missing.stderr and "none.db" in missing.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        (tmp_path / "x.db").touch()
        taken = cap_ui("--tracking-uri", f"sqlite:///{tmp_path}/x.db", "--port", str(busy.getsockname()[1]))
    assert taken.returncode == 2 and "choose another --port" in taken.stderr and "Traceback" not in taken.stderr
    away = cap_ui("--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert away.returncode == 2 and "cannot read the MLflow store" in away.stderr, away.stderr
    assert away.stderr.count("\n") == 1, away.stderr


# ---------------------------------------------------------------------------- the UI itself
def fill_store(uri: str) -> tuple[str, dict[str, str]]:
    """A sweep as cap logs it: a parent run tagged cap.sweep with three nested trials; returns the experiment id
    and the run ids by name."""
    from cap.tracking import Store

    store = Store(uri)
    eid, parent = store.create_run("ui-sweep", "sweep-ui", {"cap.sweep": "ui"})
    ids = {"sweep-ui": parent}
    for name, (acc, front) in TRIALS.items():
        _, run = store.create_run("ui-sweep", name, {"mlflow.parentRunId": parent})
        store.log_metrics(run, {"test_acc": acc, "mac_reduction": 0.5, "param_reduction": 0.4})
        store.set_tags(run, {"pareto": str(front).lower(), "mlflow.note.content": f"test_acc {acc:.4f} · {name}"})
        store.terminate(run, "FINISHED")
        ids[name] = run
    store.terminate(parent, "FINISHED")
    return eid, ids


@pytest.mark.mlflow
@pytest.mark.browser
def test_cap_ui_serves_loopback_only_and_its_links_open_cap_s_views(tmp_path):
    from tests.browser_ui import check_mlflow_ui, skip_without_browser

    skip_without_browser()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    eid, ids = fill_store(uri)
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "cap", "ui", "--tracking-uri", uri, "--port", str(port)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any(line.lstrip().startswith("(to show test_acc") for line in lines):
            line = ui.stdout.readline()
            assert line, f"cap ui ended early: {''.join(lines)}{ui.stderr.read()}"
            lines.append(line)
        out = "".join(lines)
        base = f"http://127.0.0.1:{port}"
        links = dict(re.findall(r"^  ([^:]+): +(http\S+)$", out, re.M))
        assert links["runs, best test accuracy first"] == runs_link(base, eid), out
        assert "workflowType=machine_learning" in links["the Pareto front"], out
        assert links["newest sweep, its Pareto files"] == run_link(base, eid, ids["sweep-ui"], "artifacts"), out
        assert listening_addresses(port) == {"127.0.0.1"}, "the UI listens on loopback only"

        # a fresh browser (no stored GenAI / Model training choice) opens the runs table, best first; sorted by a
        # metric, the UI lists the nested trials flat
        runs = check_mlflow_ui(base, eid, list(TRIALS), ARTIFACTS / "ui_runs.png",
                               link=links["runs, best test accuracy first"])
        assert runs["ok"], runs
        by_accuracy = sorted(TRIALS, key=lambda n: -TRIALS[n][0])
        assert [n for n in runs["run_names"] if n in TRIALS] == by_accuracy, runs["run_names"]
        front = [n for n, (_, on) in TRIALS.items() if on]
        shown = check_mlflow_ui(base, eid, front, ARTIFACTS / "ui_front.png", link=links["the Pareto front"],
                                absent=["trial-c"])
        assert shown["ok"], shown
        note = check_mlflow_ui(base, eid, ["test_acc 0.8600 · trial-b"], ARTIFACTS / "ui_run.png",
                               link=run_link(base, eid, ids["trial-b"]), table=False)
        assert note["ok"], note

        # a tracking server: only the links, nothing started
        remote = cap_ui("--tracking-uri", base, "--experiment", "ui-sweep", "--port", str(free_port()))
        assert remote.returncode == 0 and "nothing to start" in remote.stdout, remote.stdout + remote.stderr
        assert runs_link(base, eid) in remote.stdout

        ui.send_signal(signal.SIGINT)  # Ctrl-C
        assert ui.wait(timeout=60) == 0 and "stopped the MLflow UI" in ui.stdout.read()
        deadline = time.monotonic() + 30
        while listening_addresses(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not listening_addresses(port), "the server went with it"
    finally:
        if ui.poll() is None:
            os.kill(ui.pid, signal.SIGKILL)
