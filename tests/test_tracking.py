"""MLflow tracking (sqlite store and a real `mlflow server` that gets killed mid-run) and the two plots."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cap.engine.config import Config, TrackingConfig, to_dict
from cap.tracking import (
    MAX_PARAM_LEN,
    PENDING_FILE,
    REJECTED_FILE,
    STATE_FILE,
    NullTracker,
    Tracker,
    flatten,
    http_settings,
    open_tracker,
    sync_pending,
)

pytestmark = pytest.mark.mlflow

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from tests.mlflow_server import MlflowServer, free_port  # noqa: E402

# A log call against a dead server must not block training: it costs one refused connection (ms);
# generous because other jobs may load this 2-core machine.
FAST = 5.0

METRIC_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "mac_ratio", "param_ratio", "layers_kept",
               "units_kept", "theta_undecided", "epoch_seconds")


class Log(list):
    """Collects what the tracker logs."""

    def __call__(self, msg: str) -> None:
        self.append(msg)

    def having(self, text: str) -> list[str]:
        return [m for m in self if text in m]


def epoch_metrics(epoch: int) -> dict[str, float]:
    """Distinct, non-round values per key and epoch, so a swapped or rounded value is caught."""
    return {k: epoch + i / 7 + 1e-9 for i, k in enumerate(METRIC_KEYS)}


def timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def check_metrics(client: MlflowClient, run_id: str, epochs: list[int], timestamps: dict[int, int] | None = None):
    """Every metric key has exactly `epochs` as steps, in order, with the exact logged values."""
    for key in METRIC_KEYS:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        assert [m.step for m in history] == epochs, key
        assert [m.value for m in history] == [epoch_metrics(e)[key] for e in epochs], key
        for m in history:
            if timestamps and m.step in timestamps:
                assert m.timestamp == timestamps[m.step], (key, m.step)


def pending_ops(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / PENDING_FILE).read_text().splitlines()]


def download(client: MlflowClient, run_id: str, path: str, dst: Path) -> bytes:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(dst))).read_bytes()


@pytest.fixture(scope="module", autouse=True)
def _no_telemetry():
    with pytest.MonkeyPatch.context() as mp:  # no network here; keep mlflow's usage reporting quiet
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.kill()
    print(f"\nmlflow server start times (s): {', '.join(f'{s:.1f}' for s in srv.start_seconds)}")


# ------------------------------------------------------------------------------------ pure helpers


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x", "f": {}}) == {
        "a.b": 1, "a.c.d": [1, 2], "e": "x", "f": {}}
    flat = flatten(to_dict(Config()))
    assert flat["prune.tau"] == Config().prune.tau
    assert flat["train.milestones"] == [0.5, 0.75]
    assert not any(isinstance(v, dict) and v for v in flat.values())


def test_null_tracker_does_nothing(tmp_path):
    t = open_tracker(TrackingConfig(enabled=False), tmp_path / "run")
    assert isinstance(t, NullTracker) and t.run_id is None
    t.log_params({"a": 1})
    t.log_metrics({"x": 1.0}, step=1)
    t.log_artifact(tmp_path / "does-not-exist")
    t.set_tags({"a": "b"})
    t.finish("FAILED")
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_import_does_not_import_mlflow():
    code = "import sys, cap.tracking; t = cap.tracking.NullTracker(); t.finish(); print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_http_settings_scoped_and_user_values_kept(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")  # the user's choice
    with http_settings(2.5):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "33"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "33"
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    with http_settings(2.5):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"  # mlflow parses it as an int
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


# ------------------------------------------------------------------------------------ sqlite store


def test_sqlite_params_metrics_artifacts_tags_and_resume(tmp_path):
    uri = f"sqlite:///{tmp_path}/db/mlflow.db"
    (tmp_path / "db").mkdir()
    cfg = TrackingConfig(uri=uri, experiment="exp-sqlite")
    run_dir = tmp_path / "run-sqlite"
    log = Log()
    t = open_tracker(cfg, run_dir, log=log)
    assert isinstance(t, Tracker) and not t.run_id.startswith("local-")
    state = json.loads((run_dir / STATE_FILE).read_text())
    assert state["uri"] == uri and state["experiment"] == "exp-sqlite" and state["run_id"] == t.run_id

    params = flatten(to_dict(Config()))
    params["long"] = "y" * 7000
    t.log_params(params)
    for epoch in (1, 2, 3):
        t.log_metrics(epoch_metrics(epoch), step=epoch)
    artifact = run_dir / "summary.json"
    artifact.write_text(json.dumps({"acc": 0.91}))
    t.log_artifact(artifact)
    t.log_artifact(artifact, artifact_path="sub")
    t.set_tags({"cap.status": "ok", "cap.blocks": "7/9"})
    t.finish("KILLED")

    client = MlflowClient(uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "KILLED"
    assert run.info.run_name == "run-sqlite"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "exp-sqlite" and state["experiment_id"] == exp.experiment_id
    assert exp.artifact_location == str(tmp_path / "db" / "mlartifacts")  # next to the db, not in the cwd
    assert run.info.artifact_uri.startswith(str(tmp_path / "db" / "mlartifacts"))

    stored = run.data.params
    long = stored.pop("long")
    assert len(long) == MAX_PARAM_LEN and long.startswith("y" * 5000) and long.endswith("[truncated, 7000 chars]")
    assert stored == {k: str(v) for k, v in params.items() if k != "long"}
    assert stored["train.milestones"] == "[0.5, 0.75]"
    check_metrics(client, t.run_id, [1, 2, 3])
    assert download(client, t.run_id, "summary.json", tmp_path / "dl1") == artifact.read_bytes()
    assert download(client, t.run_id, "sub/summary.json", tmp_path / "dl2") == artifact.read_bytes()
    assert run.data.tags["cap.status"] == "ok" and run.data.tags["cap.blocks"] == "7/9"
    assert run.data.tags["cap.run_dir"] == str(run_dir.resolve())

    # resume: the same run goes on, RUNNING again, and ends FINISHED with all epochs
    t2 = open_tracker(cfg, run_dir, resume_run_id=t.run_id, log=log)
    assert t2.run_id == t.run_id
    assert client.get_run(t.run_id).info.status == "RUNNING"
    for epoch in (4, 5):
        t2.log_metrics(epoch_metrics(epoch), step=epoch)
    t2.finish()
    assert client.get_run(t.run_id).info.status == "FINISHED"
    check_metrics(client, t.run_id, [1, 2, 3, 4, 5])
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert not (run_dir / PENDING_FILE).exists()
    assert not log, log  # nothing to warn about


def test_refused_operation_does_not_block_later_ones(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log = Log()
    t = open_tracker(TrackingConfig(uri=uri), tmp_path / "run", log=log)
    t.log_params({"lr": 0.1})
    t.log_params({"lr": 0.2})  # mlflow refuses to change a param
    t.log_metrics(epoch_metrics(1), step=1)
    t.finish()
    assert len(log.having("refused")) == 1
    rejected = [json.loads(line) for line in (tmp_path / "run" / REJECTED_FILE).read_text().splitlines()]
    assert [r["params"] for r in rejected] == [{"lr": "0.2"}] and rejected[0]["error"]
    assert not (tmp_path / "run" / PENDING_FILE).exists()
    client = MlflowClient(uri)
    run = client.get_run(t.run_id)
    assert run.data.params == {"lr": "0.1"} and run.info.status == "FINISHED"
    check_metrics(client, t.run_id, [1])


# ------------------------------------------------------------------------------------ real server


def test_server_params_metrics_artifacts_tags(server, tmp_path):
    cfg = TrackingConfig(uri=server.uri, experiment="exp-server", run_name="named")
    run_dir = tmp_path / "run-server"
    log = Log()
    t = open_tracker(cfg, run_dir, log=log)
    t.log_params({"a.b": 1, "c": [1, 2], "d": None})
    for epoch in (1, 2):
        t.log_metrics(epoch_metrics(epoch), step=epoch)
    model = run_dir / "model.pt"
    model.write_bytes(os.urandom(300_000))
    t.log_artifact(model)
    t.set_tags({"k": "v"})
    t.finish()

    client = MlflowClient(server.uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "named"
    assert run.data.params == {"a.b": "1", "c": "[1, 2]", "d": "None"}
    assert run.data.tags["k"] == "v"
    check_metrics(client, t.run_id, [1, 2])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert download(client, t.run_id, "model.pt", tmp_path / "dl") == model.read_bytes()
    on_server = list(server.artifacts.rglob("model.pt"))
    assert len(on_server) == 1 and on_server[0].read_bytes() == model.read_bytes()
    assert len(log) == 1 and "ended FINISHED" in log[0], log  # only the link to the run, no warning
    assert log[0].endswith(f"{server.uri}/#/experiments/{run.info.experiment_id}/runs/{t.run_id}")


def test_server_killed_mid_run_flushes_on_next_call(server, tmp_path):
    run_dir = tmp_path / "run-outage"
    log = Log()
    t = open_tracker(TrackingConfig(uri=server.uri, experiment="exp-outage"), run_dir, log=log)
    t.log_params({"seed": 0})
    for epoch in (1, 2):
        t.log_metrics(epoch_metrics(epoch), step=epoch)
    try:
        server.kill()
        for epoch in (3, 4, 5):
            seconds = timed(t.log_metrics, epoch_metrics(epoch), step=epoch)
            assert seconds < FAST, f"log_metrics took {seconds:.1f} s against a dead server"
        plot = run_dir / "structure.png"
        plot.write_bytes(b"\x89PNG fake")
        assert timed(t.log_artifact, plot) < FAST
        assert timed(t.set_tags, {"phase": "outage"}) < FAST

        warnings = log.having("unreachable")
        assert len(warnings) == 1, log  # once per outage, not once per call
        assert server.uri in warnings[0] and "connection refused" in warnings[0]
        assert "training goes on" in warnings[0] and str(run_dir / PENDING_FILE) in warnings[0]
        assert f"cap sync {run_dir}" in warnings[0]
        ops = pending_ops(run_dir)  # on disk at once: a run that is never finished loses nothing
        assert [op["op"] for op in ops] == ["metrics"] * 3 + ["artifact", "tags"]
        assert [op["step"] for op in ops[:3]] == [3, 4, 5]
        stamps = {op["step"]: op["timestamp"] for op in ops[:3]}
    finally:
        server.start()
    back = int(time.time() * 1000)

    t.log_metrics(epoch_metrics(6), step=6)  # first sends what waited, in order
    assert not (run_dir / PENDING_FILE).exists()
    assert len(log.having("reachable again: sent 5 pending operations")) == 1, log
    client = MlflowClient(server.uri)
    check_metrics(client, t.run_id, [1, 2, 3, 4, 5, 6], timestamps=stamps)
    assert all(ts < back for ts in stamps.values())  # the original times, not the time of the flush
    assert client.get_run(t.run_id).data.tags["phase"] == "outage"
    assert download(client, t.run_id, "structure.png", tmp_path / "dl") == b"\x89PNG fake"
    t.finish()
    assert client.get_run(t.run_id).info.status == "FINISHED"
    assert len(log.having("unreachable")) == 1


def test_server_dead_until_after_finish_then_sync(server, tmp_path):
    cfg = TrackingConfig(uri=server.uri, experiment="exp-sync")
    run_a, run_b = tmp_path / "run-a", tmp_path / "run-b"
    log_a, log_b, log_c = Log(), Log(), Log()
    a = open_tracker(cfg, run_a, log=log_a)
    a.log_params({"tau": 0.2})
    for epoch in (1, 2):
        a.log_metrics(epoch_metrics(epoch), step=epoch)
    try:
        server.kill()
        for epoch in (3, 4):
            assert timed(a.log_metrics, epoch_metrics(epoch), step=epoch) < FAST
        summary = run_a / "summary.json"
        summary.write_text('{"done": true}')
        a.log_artifact(summary)
        assert timed(a.finish) < FAST
        assert [op["op"] for op in pending_ops(run_a)] == ["metrics", "metrics", "artifact", "terminate"]
        assert len(log_a.having("unreachable")) == 1
        assert len(log_a.having(f"send them with `cap sync {run_a}`")) == 1

        # a run opened while the server is away starts locally and is created later
        t0 = time.perf_counter()
        b = open_tracker(cfg, run_b, log=log_b)
        assert time.perf_counter() - t0 < FAST
        local_id = b.run_id
        assert local_id.startswith("local-")
        b.log_params({"tau": 0.6})
        b.log_metrics(epoch_metrics(1), step=1)
        b.finish("FAILED")
        assert [op["op"] for op in pending_ops(run_b)] == ["create_run", "params", "metrics", "terminate"]
        # a fresh run in the same folder keeps the earlier run's unsent operations aside
        c = open_tracker(cfg, run_b, log=log_c)
        c_local = c.run_id
        c.log_metrics(epoch_metrics(1), step=1)
        c.finish()
        assert (run_b / f"tracking_pending.{local_id}.jsonl").exists()
        assert len(log_c.having("earlier MLflow run")) == 1
        # `cap sync` while the server is still away: nothing sent, nothing lost, and it says so
        log = Log()
        before = (run_a / PENDING_FILE).read_text()
        assert sync_pending(run_a, log=log) == 0
        assert (run_a / PENDING_FILE).read_text() == before
        assert len(log.having("unreachable")) == 1 and len(log.having(f"`cap sync {run_a}` again")) == 1
    finally:
        server.start()

    log = Log()
    assert sync_pending(run_a, log=log) == 4
    assert not (run_a / PENDING_FILE).exists()
    assert sync_pending(run_a, log=log) == 0
    client = MlflowClient(server.uri)
    run = client.get_run(a.run_id)
    assert run.info.status == "FINISHED"
    check_metrics(client, a.run_id, [1, 2, 3, 4])
    assert download(client, a.run_id, "summary.json", tmp_path / "dl") == b'{"done": true}'

    assert sync_pending(run_b, log=log) == 4 + 3  # run b (create, params, metrics, end) and run c
    assert not list(run_b.glob("tracking_pending*"))
    state = json.loads((run_b / STATE_FILE).read_text())
    assert state["run_id"] == c.run_id and not c.run_id.startswith("local-")
    runs = {r.info.run_id: r for r in client.search_runs([state["experiment_id"]])}
    assert len(runs) == 3
    run_b_id = next(r for r in runs if r not in (a.run_id, c.run_id))
    assert runs[run_b_id].info.status == "FAILED" and runs[run_b_id].data.params == {"tau": "0.6"}
    assert runs[run_b_id].info.run_name == "run-b" and runs[c.run_id].info.status == "FINISHED"
    assert runs[run_b_id].info.start_time < runs[c.run_id].info.start_time  # original start time kept
    check_metrics(client, run_b_id, [1])
    check_metrics(client, c.run_id, [1])
    # the local id still resumes the run it became
    d = open_tracker(cfg, run_b, resume_run_id=c_local, log=log)
    assert d.run_id == c.run_id and client.get_run(c.run_id).info.status == "RUNNING"
    d.finish()


def test_hung_server_costs_one_timeout_per_call(tmp_path):
    """A server that accepts connections but never answers: each call waits `timeout`, once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # never accepted: connects succeed, answers never come
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        log = Log()
        t0 = time.perf_counter()
        t = open_tracker(TrackingConfig(uri=uri, timeout=1.0), tmp_path / "run", log=log)
        opened = time.perf_counter() - t0
        calls = [timed(t.log_metrics, epoch_metrics(e), step=e) for e in (1, 2)]
        assert t.run_id.startswith("local-")
        assert 0.9 < opened < 1.0 + FAST, opened
        assert all(0.9 < s < 1.0 + FAST for s in calls), calls  # one request of at most 1 s, not retries
        assert len(log.having("no answer within 1 s")) == 1, log
        assert [op["op"] for op in pending_ops(tmp_path / "run")] == ["create_run", "metrics", "metrics"]


def test_dead_server_call_timing(tmp_path):
    """Against a port with nothing listening: measured, must be far below the timeout."""
    uri = f"http://127.0.0.1:{free_port()}"
    t = open_tracker(TrackingConfig(uri=uri), tmp_path / "run", log=Log())
    seconds = [timed(t.log_metrics, epoch_metrics(e), step=e) for e in range(1, 6)]
    print(f"\nlog_metrics against a dead server: {', '.join(f'{s * 1000:.0f} ms' for s in seconds)}")
    assert max(seconds) < FAST


# ------------------------------------------------------------------------------------ plots


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def structure_example() -> list[dict]:
    out = []
    for s in (1, 2, 3):
        for b in (1, 2, 3):
            kept = (s, b) != (2, 2)
            out.append({"name": f"stage{s}.block{b}", "kept": kept, "units": 4 * s * b if kept else 0,
                        "of": 16 * s})
    return out


def trajectory_example() -> list[dict]:
    snaps = []
    for i in range(12):
        blocks = {}
        for s in (1, 2):
            for b in (1, 2):
                name = f"stage{s}.block{b}"
                if name == "stage2.block2" and i >= 6:
                    continue  # removed: missing from then on
                if name == "stage1.block2" and i >= 8:
                    blocks[name] = None  # removed: None
                    continue
                blocks[name] = {"layer": 1 - 0.05 * i * b, "units_mean": 0.9 - 0.02 * i * s, "units_kept_frac": 1.0}
        snaps.append({"step": 50 * i, "epoch": i / 4, "blocks": blocks})
    snaps[3]["blocks"]["stage1.block1"]["layer"] = None  # layer gates off: a gap, not a crash
    return snaps


def test_plot_structure(tmp_path):
    import matplotlib.image

    from cap.engine.plots import plot_structure

    path = plot_structure(structure_example(), tmp_path / "figs" / "structure.png", title="resnet20")
    assert path == tmp_path / "figs" / "structure.png"
    width, height = png_size(path)
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (height, width) and width > 500 and height > 300
    # a wider network gives a wider figure
    wide = plot_structure(structure_example() * 4, tmp_path / "wide.png")
    assert png_size(wide)[0] > width
    with pytest.raises(ValueError, match="empty"):
        plot_structure([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="lacks"):
        plot_structure([{"name": "stage1.block1", "kept": True}], tmp_path / "bad.png")
    assert not (tmp_path / "empty.png").exists()


def test_plot_theta_trajectory(tmp_path):
    import matplotlib.image

    from cap.engine.plots import plot_theta_trajectory

    path = plot_theta_trajectory(trajectory_example(), tmp_path / "thetas.png")
    width, height = png_size(path)
    assert matplotlib.image.imread(path).shape[:2] == (height, width) and width > 500 and height > 400
    one = plot_theta_trajectory(trajectory_example()[:1], tmp_path / "one.png")  # a single snapshot
    assert png_size(one)[0] > 0
    with pytest.raises(ValueError, match="empty"):
        plot_theta_trajectory([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="no blocks"):
        plot_theta_trajectory([{"step": 0, "epoch": 0.0, "blocks": {}}], tmp_path / "none.png")


# ------------------------------------------------------------------ `cap sync` and `cap pareto` on bad input


def cap_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "cap", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_cap_sync_with_a_corrupt_state_file_names_it_and_keeps_the_queue(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / STATE_FILE).write_text('{"uri": "http://127.0.0.1:1", "run_')  # torn write
    queued = json.dumps({"op": "metrics", "metrics": {"a": 1.0}, "step": 1, "timestamp": 1}) + "\n"
    (run_dir / PENDING_FILE).write_text(queued)
    result = cap_cli("sync", str(run_dir), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: {run_dir / STATE_FILE} is corrupt (not valid JSON: ")
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert (run_dir / PENDING_FILE).read_text() == queued  # nothing lost
    (run_dir / STATE_FILE).write_text("[]")  # JSON, but not the mapping it must be
    result = cap_cli("sync", str(run_dir), cwd=tmp_path)
    assert result.returncode == 2 and "is corrupt (a list, not a mapping)" in result.stderr, result.stderr


@pytest.mark.parametrize("folder,needle", [
    ("missing", "is not a folder; give a run folder (what cap train --out wrote)"),
    ("empty", "is not a tracked run folder: it holds no tracking.json and no tracking_pending.jsonl (cap train "
              "writes them when tracking.enabled is true)"),
])
def test_cap_sync_on_a_folder_that_is_not_a_run_fails(tmp_path, folder, needle):
    (tmp_path / "empty").mkdir()
    result = cap_cli("sync", str(tmp_path / folder), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / folder} {needle}"
    assert "sent 0" not in result.stdout


def test_cap_pareto_without_a_server_fails_fast_with_one_line(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.perf_counter()
    result = cap_cli("pareto", "--experiment", "x", "--tracking-uri", uri, "--out", str(tmp_path / "p"), cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip() == (f"error: MLflow tracking store {uri} cannot be read (connection refused); start "
                                     "the server, or give the URI of a running one with --tracking-uri")
    assert seconds < 60  # one refused connection (and the imports), not minutes of retries
    assert not (tmp_path / "p").exists()


def test_warnings_go_to_stderr_and_results_to_stdout(tmp_path):
    from cap.engine.console import console

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / STATE_FILE).write_text(json.dumps({"uri": uri, "experiment": "x", "experiment_id": "1",
                                                  "run_id": "abc"}))
    (run_dir / PENDING_FILE).write_text(json.dumps({"op": "metrics", "metrics": {"a": 1.0}, "step": 1,
                                                    "timestamp": 1}) + "\n")
    result = cap_cli("sync", str(run_dir), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == f"sent 0 pending tracking operations from {run_dir}"
    assert f"warning: tracking server {uri} unreachable (connection refused)" in result.stderr

    # a training run with the server away: its warning on stderr, its progress lines on stdout
    out = tmp_path / "train"
    result = cap_cli("train", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"),
                     "--out", str(out), "train.epochs=1", "data.train_subset=200", "data.test_subset=100",
                     "train.progress=false", f"tracking.uri={uri}", "tracking.timeout=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning:" not in result.stdout and "done: test_acc" in result.stdout
    assert f"warning: tracking server {uri} unreachable" in result.stderr

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as out_text, contextlib.redirect_stderr(io.StringIO()) as err_text:
        console("epoch 1: loss 2.3")
        console("warning: something to know")
    assert (out_text.getvalue(), err_text.getvalue()) == ("epoch 1: loss 2.3\n", "warning: something to know\n")
