"""`cap ui [--tracking-uri URI] [--port 5000] [--experiment NAME]`: the MLflow UI on cap's store, with links that
open cap's views (runs by test accuracy, the Pareto front, the newest sweep, the newest comparison)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

EXIT_USAGE = 2
START_SECONDS = 120.0
"""how long `mlflow server` may take to answer /health"""


class UiError(Exception):
    """Something to fix before the UI can start; the message says what and how."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cap ui",
        description="Start the MLflow UI on the store `cap train` and `cap sweep` log to (--tracking-uri, else "
                    "$MLFLOW_TRACKING_URI, else ./mlflow.db) and print links that open cap's views. For a "
                    "tracking server (http/https) nothing is started: only the links are printed. Ctrl-C stops it.")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--experiment", help="the experiment to link (default: the one updated last)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; anything "
                                                           "else lets other machines read and change the runs)")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on (default 5000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from cap.tracking import resolve_uri
    from cap.tracking.uri import is_server

    args = build_parser().parse_args(argv)
    uri = resolve_uri(args.tracking_uri)
    try:
        if is_server(uri):
            print(f"{uri} is a tracking server: nothing to start")
            print_links(uri, uri, args.experiment)
            return 0
        return serve(uri, args.host, args.port, args.experiment)
    except UiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def print_links(uri: str, base_url: str, experiment: str | None) -> None:
    """The links into the UI at `base_url` for `experiment` (None: the experiment updated last) of the store."""
    from cap.sweeps import SWEEP_TAG
    from cap.tracking import Store
    from cap.tracking.links import COMPARISON_FILTER, FRONT_FILTER, run_link, runs_link

    store = Store(uri)
    try:
        exp = store.experiment(experiment)
    except Exception as exc:  # noqa: BLE001 - whatever mlflow raises for an unreachable or unreadable store
        raise UiError(f"cannot read the MLflow store {uri}: {str(exc).splitlines()[0][:300]}") from exc
    if exp is None:
        if experiment is not None:
            raise UiError(f"no experiment '{experiment}' in {uri}; leave --experiment out to link the one "
                          "updated last")
        print(f"no runs in {uri} yet: the UI is at {base_url}")
        return
    eid = exp.experiment_id
    print(f"experiment '{exp.name}' (id {eid}):")
    print(f"  runs, best test accuracy first: {runs_link(base_url, eid)}")
    print(f"  the Pareto front:               {runs_link(base_url, eid, FRONT_FILTER)}")
    sweep = store.newest_run(eid, f"tags.`{SWEEP_TAG}` LIKE '%'")
    if sweep is not None:
        print(f"  newest sweep, its Pareto files: {run_link(base_url, eid, sweep.info.run_id, 'artifacts')}")
    comparison = store.newest_run(eid, COMPARISON_FILTER)
    if comparison is not None:
        print(f"  newest comparison:              {run_link(base_url, eid, comparison.info.run_id, 'artifacts')}")
    print("  (to show test_acc, mac_reduction and param_reduction as columns: \"Columns\" above the table, tick "
          "them under Metrics; the browser keeps the choice)")


def serve(uri: str, host: str, port: int, experiment: str | None) -> int:
    """Run `mlflow server` on the local store `uri` until Ctrl-C; print the links once it answers."""
    from cap.tracking.uri import local_artifact_location, sqlite_path

    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise UiError(f"no MLflow store at {database}: `cap train` and `cap sweep` make it in the folder they run "
                      "in; run cap ui there, or give --tracking-uri")
    _check_free(host, port)
    if not _is_loopback(host):
        print(f"warning: the MLflow UI listens on {host}: whoever reaches this machine can read and change the "
              "runs (the MLflow server has no login); leave --host out to keep it to this machine", file=sys.stderr)
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    artifacts = local_artifact_location(uri)
    if artifacts:
        command += ["--artifacts-destination", artifacts]
    # no job execution: its background workers serve nothing this UI shows, and slow the start
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    handle, name = tempfile.mkstemp(prefix="cap-ui-", suffix=".log")  # uvicorn logs every request
    os.close(handle)
    log = Path(name)
    with open(log, "w") as out:
        server = subprocess.Popen(command, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _wait_healthy(server, base_url, log)
        print(f"MLflow UI for {uri} at {base_url} (Ctrl-C stops it; its log: {log})", flush=True)
        print_links(uri, base_url, experiment)
        sys.stdout.flush()
        server.wait()
        raise UiError(f"mlflow server exited with status {server.returncode}: {_tail(log)}")
    except KeyboardInterrupt:
        print("\nstopped the MLflow UI")
        return 0
    finally:
        _stop(server)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError) as exc:
        raise UiError(f"--host {host}: not an address of this machine ({exc})") from exc


def _check_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UiError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port") from exc


def _wait_healthy(server: subprocess.Popen, base_url: str, log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise UiError(f"mlflow server exited with status {server.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise UiError(f"mlflow server did not answer at {base_url} within {START_SECONDS:.0f} s (its log: {log})")


def _tail(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return (lines[-1][:300] if lines else "no output") + f" (its log: {log})"


def _stop(server: subprocess.Popen) -> None:
    """The server's whole process group (uvicorn runs the app in a child process)."""
    if server.poll() is None:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(main())
