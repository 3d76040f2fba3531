"""`cap sweep` and `cap pareto` for real: Ray Tune trials that train, an MLflow server, a browser.

One sweep (8 tiny trials: 4 tau values x 2 learning rates, the 1e6 rate diverges) runs once against a
real `mlflow server`; the tests check its trials, the retry and report of the failing ones, the MLflow
parent/child runs, the Pareto files and tags, and what the MLflow UI shows in headless Chromium.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cap.engine.config import ConfigError
from cap.sweeps.pareto import hypervolume_2d, hypervolume_3d, non_dominated
from cap.sweeps.spec import SweepSpecError, load_sweep
from tests.mlflow_server import MlflowServer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
TINY = ["data.train_subset=600", "data.test_subset=300", "prune.warmup_epochs=0.5", "prune.check_every=5",
        "prune.eta=0.03", "prune.bn_batches=2"]


def write_sweep(folder: Path, **fields) -> Path:
    spec = {"name": "t", "base": {"config": SMOKE, "overrides": TINY + ["train.epochs=2"]},
            "space": {"prune.tau": {"grid": [0.3, 1.0]}}, "resources": {"cpus": 1}, "max_concurrent": 2,
            "storage": str(folder / "sweeps_out"), "tracking": {"experiment": "sweep-test"}}
    spec.update(fields)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cap_cli(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cap", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


# ------------------------------------------------------------------------------------ spec validation


@pytest.mark.parametrize("fields,needle", [
    ({"space": {"prune.alpha": {"grid": [0.5, 1.5]}}}, "key 'space.prune.alpha': value 1.5 is not valid"),
    ({"space": {"prune.tua": {"grid": [0.5]}}}, "unknown config key 'prune.tua'"),
    ({"space": {"prune.tau": {"loguniform": [0.0, 1.0]}}}, "loguniform needs low > 0"),
    ({"space": {"prune.tau": {"uniform": [2.0, 1.0]}}}, "needs low < high"),
    ({"space": {"prune.tau": {"normal": [0, 1]}}}, "unknown kind 'normal'"),
    ({"space": {"prune.tau": {"uniform": [0.1, 1.0]}}, "search": "grid"}, "search: grid takes only"),
    ({"space": {"prune.tau": {"grid": [0.1, 1.0]}}, "search": "optuna"}, "use choice instead of grid"),
    ({"search": "bayes"}, "key 'search': got 'bayes'"),
    ({"num_samples": 0}, "key 'num_samples'"),
    ({"resources": {"cpu": 1}}, "key 'resources.cpu': unknown key"),
    ({"scheduler": {"type": "hyperband"}}, "key 'scheduler.type'"),
    ({"trials": 3}, "key 'trials': unknown key"),
    ({"base": {"config": "missing.yaml"}}, "key 'base.config'"),
    ({"base": {"config": SMOKE, "overrides": ["train.epochs=zero"]}}, "train.epochs"),
    # every value a dimension can produce is checked, as for prune.*: an unknown model in a choice fails now
    ({"space": {"model.name": {"choice": ["resnet20", "resnet21"]}}},
     "key 'space.model.name': value 'resnet21' is not valid"),
    ({"scheduler": {"grace_period": "abc", "reduction_factor": 0}}, "key 'scheduler.grace_period': got 'abc'"),
    ({"scheduler": {"reduction_factor": 0}}, "key 'scheduler.reduction_factor': got 0, expected a number > 1"),
    ({"scheduler": {"grace_period": 3}}, "at most the base's train.epochs"),
])
def test_bad_sweep_files_name_the_key(tmp_path, fields, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        load_sweep(write_sweep(tmp_path, **fields))


def test_missing_name_and_cli_exit_status(tmp_path):
    path = write_sweep(tmp_path)
    raw = yaml.safe_load(path.read_text())
    del raw["name"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SweepSpecError, match="key 'name': missing"):
        load_sweep(path)
    result = cap_cli("sweep", str(path), cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "key 'name': missing" in result.stderr
    assert not (tmp_path / "sweeps_out").exists()  # nothing started


def test_shipped_sweeps_are_valid():
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        spec = load_sweep(path)
        searched = {d.key for d in spec.space}
        assert searched & {"prune.tau", "prune.target_macs", "prune.target_params"}, path  # tau, or a budget


# ------------------------------------------------------------------------------- one real sweep, served


@pytest.fixture(scope="module")
def served_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    server = MlflowServer(root / "mlflow")
    server.start()
    try:
        path = write_sweep(root, name="tiny", space={"prune.tau": {"grid": [0.1, 1.5, 4.0]},
                                                     "train.lr": {"grid": [0.1, 1.0e6]}},
                           search="grid", max_failures=1, tracking={"uri": server.uri, "experiment": "sweep-test"})
        t0 = time.perf_counter()
        result = cap_cli("sweep", str(path), cwd=root)
        seconds = time.perf_counter() - t0
        folder = root / "sweeps_out" / "tiny"
        yield {"root": root, "server": server, "result": result, "folder": folder, "seconds": seconds,
               "rows": json.loads((folder / "sweep_results.json").read_text()) if folder.exists() else []}
    finally:
        server.kill()


def _client(served):
    from mlflow import MlflowClient

    return MlflowClient(served["server"].uri)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_sweep_trials_train_and_failures_are_retried_then_reported(served_sweep):
    result, rows = served_sweep["result"], served_sweep["rows"]
    assert result.returncode == 1, result.stderr[-3000:]  # some trials failed: the exit status says so
    assert f"the runs in the MLflow UI: {served_sweep['server'].uri}/#/experiments/" in result.stdout  # a server
    assert len(rows) == 6
    finished = [r for r in rows if r["status"] == "finished"]
    failed = [r for r in rows if r["status"] == "error"]
    assert sorted(r["prune.tau"] for r in finished) == [0.1, 1.5, 4.0]
    assert all(r["train.lr"] == 0.1 for r in finished) and all(r["attempts"] == 1 for r in finished)
    assert len(failed) == 3 and all(r["train.lr"] == 1.0e6 for r in failed)
    for row in failed:  # retried once (max_failures=1), then reported with the trial's own error
        assert row["attempts"] == 2, row
        assert "diverged" in row["error"], row
        assert f"trial {row['trial_id']} failed after 2 attempt(s)" in result.stdout
        assert (Path(row["run_dir"]) / "train.log").read_text().count("failed: TrainingDiverged") == 2
    for row in finished:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert summary["epochs"] == 2 and summary["tau"] == row["prune.tau"]
        assert summary["test_acc"] == pytest.approx(row["test_acc"])
        assert 1 - summary["mac_ratio"] == pytest.approx(row["mac_reduction"])
    # the trials prune (how much per tau is the trainer's business: tests/test_training.py)
    assert max(r["mac_reduction"] for r in finished) > 0.3
    with (served_sweep["folder"] / "sweep_results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_sweep_runs_are_nested_mlflow_runs_with_params_and_final_metrics(served_sweep):
    client = _client(served_sweep)
    exp = client.get_experiment_by_name("sweep-test")
    state = json.loads((served_sweep["folder"] / "sweep.json").read_text())
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["cap.sweep"] == "tiny"
    assert parent.data.metrics["trials"] == 6 and parent.data.metrics["trials_failed"] == 3
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    done = [r for r in children if r.info.status == "FINISHED"]
    assert len(done) == 3
    rows = {r["mlflow_run_id"]: r for r in served_sweep["rows"] if r["status"] == "finished"}
    assert set(rows) == {r.info.run_id for r in done}
    for run in done:
        row = rows[run.info.run_id]
        assert float(run.data.params["prune.tau"]) == row["prune.tau"]
        assert {"prune.alpha", "prune.beta"} <= set(run.data.params)
        assert run.data.metrics["final_test_acc"] == pytest.approx(row["test_acc"])
        assert run.data.metrics["mac_reduction"] == pytest.approx(row["mac_reduction"])
    # a failed trial's first attempt is superseded by its retry; neither counts as a result
    failed_runs = [r for r in children if r.info.status == "FAILED"]
    assert len(failed_runs) == 6
    assert sum(r.data.tags.get("cap.superseded") == "true" for r in failed_runs) == 3


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_sweep_pareto_files_tags_and_hypervolumes(served_sweep):
    client = _client(served_sweep)
    folder = served_sweep["folder"] / "pareto"
    with (folder / "pareto.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3
    acc, mac, par = ([float(r[k]) for r in table] for k in ("test_acc", "mac_reduction", "param_reduction"))
    fronts = {"acc_mac": list(zip(acc, mac, strict=True)), "acc_param": list(zip(acc, par, strict=True)),
              "acc_mac_param": list(zip(acc, mac, par, strict=True))}
    summary = json.loads((folder / "pareto.json").read_text())
    for name, points in fronts.items():
        members = set(non_dominated(points))
        assert [r[f"front_{name}"] == "True" for r in table] == [i in members for i in range(3)], name
        front = [points[i] for i in members]
        volume = hypervolume_2d(front) if len(points[0]) == 2 else hypervolume_3d(front)
        assert summary["hypervolume"][name] == pytest.approx(volume)
    parent_id = json.loads((served_sweep["folder"] / "sweep.json").read_text())["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.metrics["hypervolume_acc_mac_param"] == pytest.approx(summary["hypervolume"]["acc_mac_param"])
    assert {a.path for a in client.list_artifacts(parent_id, "pareto")} >= {"pareto/pareto.png", "pareto/pareto.html"}
    for row in table:
        tags = client.get_run(row["run_id"]).data.tags
        assert tags["pareto"] == row["front_acc_mac_param"].lower()
        assert tags["pareto_acc_mac"] == row["front_acc_mac"].lower()
    assert (folder / "pareto.png").stat().st_size > 10_000
    assert "plotly" in (folder / "pareto.html").read_text()[:200_000].lower()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_pareto_cli_on_the_sweep_without_parent(served_sweep, tmp_path):
    # the whole experiment: the same three finished runs (the parent and the failed attempts are left out)
    result = cap_cli("pareto", "--experiment", "sweep-test", "--tracking-uri", served_sweep["server"].uri,
                     "--out", str(tmp_path / "p"), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "p" / "pareto.json").read_text())["runs"] == 3
    assert "workflowType=machine_learning" in result.stdout.splitlines()[-1]  # where to look at them
    missing = cap_cli("pareto", "--experiment", "nope", "--tracking-uri", served_sweep["server"].uri, cwd=tmp_path,
                      timeout=300)
    assert missing.returncode == 2 and "experiment 'nope' does not exist" in missing.stderr


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_mlflow_ui_shows_the_sweep_runs_and_the_pareto_tag(served_sweep):
    from tests.browser_ui import check_mlflow_ui, skip_without_browser

    skip_without_browser()
    table = list(csv.DictReader((served_sweep["folder"] / "pareto" / "pareto.csv").open()))
    names = [r["run_name"] for r in table]
    on_front = {r["run_name"] for r in table if r["front_acc_mac_param"] == "True"}
    shots = ROOT / "test-artifacts" / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    uri = served_sweep["server"].uri
    parent = json.loads((served_sweep["folder"] / "sweep.json").read_text())["parent_run_id"]
    top = check_mlflow_ui(uri, "sweep-test", ["tiny"], shots / "mlflow_sweep_parent.png")
    assert top["ok"], top  # the sweep's parent run (its trials are nested under it, collapsed)
    trials = check_mlflow_ui(uri, "sweep-test", names, shots / "mlflow_sweep_runs.png",
                             filter_string=f"tags.mlflow.parentRunId = '{parent}'", expand_nested=True)
    assert trials["ok"] and not trials["missing"], trials
    front = check_mlflow_ui(uri, "sweep-test", sorted(on_front),
                            shots / "mlflow_sweep_pareto.png", filter_string="tags.pareto = 'true'",
                            absent=sorted(set(names) - on_front), expand_nested=True)
    assert front["ok"] and not front["missing"], front
    assert set(front["run_names"]) - {"tiny"} == on_front  # the parent is drawn to nest them under
    assert (shots / "mlflow_sweep_pareto.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------ interrupt, resume


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_an_interrupted_sweep_resumes_without_redoing_finished_trials(tmp_path):
    path = write_sweep(tmp_path, name="resume", space={"prune.tau": {"grid": [0.2, 0.8, 2.0]}}, search="grid",
                       max_concurrent=1, base={"config": SMOKE, "overrides": TINY + ["train.epochs=3"]},
                       tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "resume"})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = tmp_path / "sweeps_out" / "resume" / "runs"
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cap", "sweep", str(path)], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not list(runs.glob("*/summary.json")):  # the first trial has finished
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # Ray Tune stops gracefully and saves the experiment state
        assert proc.wait(timeout=300) == 130, (tmp_path / "first.log").read_text()[-3000:]
    first = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/summary.json")}
    assert 1 <= len(first) < 3

    again = cap_cli("sweep", str(path), cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the sweep" in again.stdout
    rows = json.loads((tmp_path / "sweeps_out" / "resume" / "sweep_results.json").read_text())
    assert [r["status"] for r in rows] == ["finished"] * 3
    for trial, mtime in first.items():  # finished trials were not trained again
        assert (runs / trial / "summary.json").stat().st_mtime_ns == mtime
        # (a trial interrupted between writing its summary and Ray recording it is restarted, and only reports)
        assert (runs / trial / "train.log").read_text().count("done: test_acc") == 1

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("resume")
    parents = client.search_runs([exp.experiment_id], "tags.`cap.sweep` = 'resume'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # one parent run across both starts
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    counted = [r for r in children if r.info.status == "FINISHED" and r.data.tags.get("cap.superseded") != "true"]
    assert sorted(float(r.data.params["prune.tau"]) for r in counted) == [0.2, 0.8, 2.0]


SWEEP_RAY = """
import sys
from cap.sweeps.spec import load_sweep
from cap.sweeps.tune import _init_ray
import ray
_init_ray(None, load_sweep(sys.argv[1]), print)
from os import environ
print("gcs", ray.get_runtime_context().gcs_address, environ["RAY_AUTH_MODE"], environ["RAY_AUTH_TOKEN"], flush=True)
sys.stdin.read()  # until the test closes it
ray.shutdown()
"""
CONNECT = "import ray; ray.init(address=__import__('sys').argv[1]); print('connected', ray.cluster_resources())"


@pytest.mark.slow
@pytest.mark.ray
def test_the_sweeps_ray_refuses_callers_without_its_token(tmp_path):
    """Ray's servers listen beyond loopback (this Ray has no bind address); a caller without the sweep's token
    (another user, another machine) is refused, and the token is in no file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"PYTHONPATH": str(ROOT)}
    token_file = Path.home() / ".ray" / "auth_token"
    had_token_file = token_file.exists()
    # a cluster named elsewhere (RAY_ADDRESS, or /tmp/ray/ray_current_cluster of an earlier `ray start`) is not
    # the sweep's: it starts a Ray of its own
    driver = subprocess.Popen([sys.executable, "-c", SWEEP_RAY, str(write_sweep(tmp_path))], text=True,
                              env=env | {"RAY_ADDRESS": "127.0.0.1:9"},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        line = ""
        while not line.startswith("gcs "):
            line = driver.stdout.readline()
            assert line or driver.poll() is None, "the sweep's Ray did not start"
        gcs, mode, token = line.split()[1:]
        stranger = subprocess.run([sys.executable, "-c", CONNECT, gcs], env=env, capture_output=True, text=True,
                                  timeout=300)
        assert stranger.returncode != 0 and "connected" not in stranger.stdout
        assert "Authentication token is missing or incorrect" in stranger.stderr, stranger.stderr[-2000:]
        assert mode == "token" and len(token) == 64  # a fresh one per sweep
        member = subprocess.run([sys.executable, "-c", CONNECT, gcs], capture_output=True, text=True, timeout=300,
                                env=env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        assert member.returncode == 0 and "connected" in member.stdout, member.stderr[-2000:]
        assert token_file.exists() == had_token_file  # the token lives in the processes' environment only
    finally:
        driver.stdin.close()
        driver.wait(timeout=120)


def test_a_changed_space_does_not_resume_into_the_old_folder(tmp_path):
    from cap.sweeps.tune import SweepError, run_sweep

    path = write_sweep(tmp_path)
    folder = tmp_path / "sweeps_out" / "t"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"fingerprint": "0" * 16, "parent_run_id": "x"}))
    with pytest.raises(SweepError, match="different space or base experiment"):
        run_sweep(load_sweep(path))
    assert json.loads((folder / "sweep.json").read_text())["parent_run_id"] == "x"  # left as it was
