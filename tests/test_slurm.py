"""`cap submit` on a real SLURM cluster (slurm/local-cluster.sh: slurmctld, slurmd, slurmdbd + MariaDB
on this machine): a 2-task DDP job that prunes, a requeued job that resumes to the same network, a sweep
whose trials are MLflow runs, and bad profiles refused before anything is queued.

The cluster is started here if it is not up (idempotent). The tests skip only where it cannot run
(not root, or no apt-get to install it); in CI it runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml

from cap.launch.profile import ProfileError, parse_profile, parse_time
from tests.test_resume import assert_same_run
from tests.test_tracking_training import EPOCH_METRICS, artifact_names

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "slurm" / "local-cluster.sh"
# 2 ranks x 10 steps an epoch; with half an epoch of warm-up units are removed from step 19 on (before the
# requeue in epoch 3), and the deterministic network drops blocks by epoch 3
TRAIN = ["--config", str(ROOT / "configs" / "smoke.yaml"), "data.train_subset=1200", "data.test_subset=400",
         "train.epochs=4", "train.threads=1", "prune.check_every=5", "prune.tau=1.0", "prune.eta=0.05",
         "prune.warmup_epochs=0.5",
         "train.progress=false", "tracking.experiment=cap-slurm"]
LOCAL = yaml.safe_load((ROOT / "slurm" / "local.yaml").read_text())


# ---------------------------------------------------------------------------- profiles (no cluster needed)
@pytest.mark.parametrize("text,minutes", [(30, 30), ("45", 45), ("10:30", 11), ("01:00:00", 60), ("2-0", 2880),
                                          ("1-02:03", 1563), ("0-00:00:59", 1)])
def test_slurm_time_formats(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("change,key", [
    ({"partitoin": "debug"}, "partitoin"),          # unknown key
    ({"time": None}, "time"),                       # missing key
    ({"time": "1:2:3:4"}, "time"),
    ({"mem": "lots"}, "mem"),
    ({"nodes": 0}, "nodes"),
    ({"gpus_per_node": 4, "tasks_per_node": 2}, "tasks_per_node"),  # one task per GPU
    ({"extra_sbatch": ["--exclusive"]}, "extra_sbatch"),
])
def test_malformed_profiles_name_the_key(change, key):
    data = {**LOCAL, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ProfileError, match=re.escape(key)):
        parse_profile(data)


def test_gpu_profile_example_parses_to_one_task_per_gpu():
    profile = parse_profile(yaml.safe_load((ROOT / "slurm" / "gpu-example.yaml").read_text()))
    assert profile.tasks_per_node == profile.gpus_per_node == 8 and profile.nodes == 2
    options = profile.sbatch_options()
    assert options["gpus-per-node"] == 8 and options["requeue"] is True and options["time"] == profile.time_min


def test_multi_node_sweep_ray_commands_join_one_head():
    from cap.launch.jobs import ray_start_command

    resources = {"CPU": 32, "GPU": 8}
    head = ray_start_command("node1", 23456, resources, is_head=True)
    worker = ray_start_command("node1", 23456, resources, is_head=False)
    assert head[1:4] == ["start", "--head", "--node-ip-address=node1"] and "--port=23456" in head
    assert worker[1:3] == ["start", "--address=node1:23456"]
    for cmd in (head, worker):
        assert cmd[-1] == "--block" and "--num-cpus=32" in cmd and "--num-gpus=8" in cmd


CONNECT = "import ray; ray.init(address=__import__('sys').argv[1]); print('connected', ray.cluster_resources())"


def _task_environment(folder: Path, is_head: bool) -> dict[str, str]:
    """The environment a task of job 77 gives `ray start` after share_ray_token (this process's is restored)."""
    from cap.launch.jobs import ray_environment, share_ray_token

    with mock.patch.dict(os.environ):
        for key in [k for k in os.environ if k.startswith("RAY_AUTH")]:
            del os.environ[key]
        share_ray_token(folder, "77", is_head=is_head)
        return ray_environment()


@pytest.mark.ray
def test_the_multi_node_sweep_jobs_ray_refuses_callers_without_the_jobs_token(tmp_path):
    """The head task writes a fresh token only its user can read; the other tasks read the same one; a Ray head
    started as the job starts it refuses a caller without it and admits one with it."""
    from cap.launch.jobs import _wait_for_port, ray_start_command

    head_env, worker_env = _task_environment(tmp_path, True), _task_environment(tmp_path, False)
    assert head_env["RAY_AUTH_MODE"] == worker_env["RAY_AUTH_MODE"] == "token"
    assert head_env["RAY_AUTH_TOKEN"] == worker_env["RAY_AUTH_TOKEN"] and len(head_env["RAY_AUTH_TOKEN"]) == 64
    assert stat.S_IMODE((tmp_path / ".77_ray_token").stat().st_mode) == 0o600
    assert _task_environment(tmp_path, True)["RAY_AUTH_TOKEN"] != head_env["RAY_AUTH_TOKEN"]  # fresh per start
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    head_env = _task_environment(tmp_path, True)
    # its own temp folder (short: Ray's socket paths must fit 107 characters), so that no later `ray.init` of
    # this machine finds this cluster in /tmp/ray/ray_current_cluster
    command = [*ray_start_command("127.0.0.1", port, {"CPU": 1, "GPU": 0}, is_head=True),
               f"--temp-dir={tempfile.mkdtemp(prefix='ray-', dir='/tmp')}"]
    head = subprocess.Popen(command, env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port("127.0.0.1", port, 120)
        plain = {k: v for k, v in head_env.items() if not k.startswith("RAY_AUTH")}
        stranger = subprocess.run([sys.executable, "-c", CONNECT, f"127.0.0.1:{port}"], env=plain,
                                  capture_output=True, text=True, timeout=300)
        assert stranger.returncode != 0 and "connected" not in stranger.stdout
        assert "Authentication token is missing or incorrect" in stranger.stderr, stranger.stderr[-2000:]
        member = subprocess.run([sys.executable, "-c", CONNECT, f"127.0.0.1:{port}"],
                                env=_task_environment(tmp_path, False), capture_output=True, text=True, timeout=300)
        assert member.returncode == 0 and "connected" in member.stdout, member.stderr[-2000:]
    finally:
        head.terminate()
        head.wait(timeout=120)


# ---------------------------------------------------------------------------- the live cluster
def _cluster_up() -> bool:
    return subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def cluster() -> None:
    if not _cluster_up():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("the local SLURM cluster needs root and apt-get to install and start it "
                        f"({CLUSTER} start)")
        started = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, f"{CLUSTER} start failed:\n{started.stderr[-3000:]}"


def cap_submit(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cap", "submit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def job_id(output: str) -> str:
    return re.search(r"submitted job (\d+)", output).group(1)


def sacct_state(job: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True, text=True).stdout
    return out.split("\n")[0].strip()


def queued_jobs() -> set[str]:
    return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


def check_mlflow(run_dir: Path, uri: str, epochs: int) -> None:
    """One FINISHED MLflow run in the store the submit directory implies, with every epoch's figures."""
    from mlflow.tracking import MlflowClient

    summary = json.loads((run_dir / "summary.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and run.data.params["prune.tau"] == "1.0"
    for key in EPOCH_METRICS:
        logged = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in logged] == list(range(1, epochs + 1)), key
        if key != "epoch_seconds":
            assert [m.value for m in logged] == [float(h[key]) for h in history], key
    assert {"summary.json", "model.pt", "config.yaml"} <= artifact_names(client, run.info.run_id)


@pytest.fixture(scope="module")
def ddp_run(cluster, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The 2-task job never interrupted (`cap submit --wait`), the reference for the requeued ones."""
    where = tmp_path_factory.mktemp("slurm-ddp")
    done = cap_submit(where, "--cluster", str(ROOT / "slurm" / "local.yaml"), "--wait", "--", "train", *TRAIN,
                      "--out", "run")
    return where, done


@pytest.mark.slurm
def test_two_task_ddp_job_prunes_finishes_and_is_tracked(ddp_run):
    where, done = ddp_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = where / "run"
    assert f"run folder {run_dir}" in done.stdout and f"logs: {run_dir}/slurm/" in done.stdout
    assert f"MLflow: sqlite:///{where}/mlflow.db" in done.stdout
    assert re.search(r"job \d+ COMPLETED", done.stdout)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 4
    assert summary["units_kept"] < summary["units_total"] and summary["layers_kept"] < summary["layers_total"]
    digests = summary["final_weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert f"MLflow run {summary['mlflow_run_id']}" in done.stdout
    check_mlflow(run_dir, f"sqlite:///{where}/mlflow.db", 4)


def _removed(arch: dict) -> dict[str, tuple[bool, list[int]]]:
    return {f"{b['stage']}.{b['index']}": (b["removed"], b.get("widths")) for b in arch["blocks"]}


@pytest.mark.slurm
@pytest.mark.parametrize("how", ["scontrol requeue", "SIGUSR2"])
def test_requeued_job_resumes_to_the_uninterrupted_network(ddp_run, tmp_path, how):
    """SLURM requeues the job (SIGTERM), or submitit's time-limit/preemption signal asks the job to requeue
    itself; either way the trainer checkpoints first, and the requeued job ends where the uninterrupted did."""
    from cap.engine.checkpoint import read_checkpoint

    done = cap_submit(tmp_path, "--cluster", str(ROOT / "slurm" / "local.yaml"), "--", "train", *TRAIN,
                      "--out", "run", timeout=120)
    assert done.returncode == 0, done.stderr
    job, run_dir = job_id(done.stdout), tmp_path / "run"
    log = run_dir / "slurm" / f"{job}_0_log.out"
    wait_for(lambda: log.exists() and "epoch 2/4" in log.read_text(), 300, "epoch 2 (units removed by then)")
    if how == "SIGUSR2":
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
    else:
        subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(lambda: sacct_state(job) in ("REQUEUED", "PENDING"), 60, "the job to be requeued")
    before = read_checkpoint(run_dir / "checkpoints" / "last.pt")  # what the stopped job left
    assert before["position"]["epoch"] >= 2 and before["world_size"] == 2
    wait_for(lambda: sacct_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 420, "the job to end")
    assert sacct_state(job) == "COMPLETED"
    import submitit

    results = submitit.SlurmJob(run_dir / "slurm", job, tasks=(0, 1)).results()  # every task reports success
    assert results[0]["epochs"] == 4 and results[1] == {}
    text = log.read_text()
    assert "resuming" in text and text.count("Starting with JobEnvironment") == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 4 and len(json.loads((run_dir / "history.json").read_text())) == 4
    # what was pruned before the requeue stays pruned: the events are a prefix, blocks never come back
    events = before["pruner"]["state"]["events"]
    assert events and summary["prune_events"][:len(events)] == events
    final = _removed(__import__("torch").load(run_dir / "model.pt", weights_only=True)["arch"])
    for block, (removed, widths) in _removed(before["arch"]).items():
        assert final[block][0] or not removed, f"block {block} came back"
        assert removed or final[block][0] or all(a <= b for a, b in zip(final[block][1], widths, strict=True))
    assert summary["mlflow_run_id"] == before["tracking_run_id"], "the requeued job continues the same MLflow run"
    reference = ddp_run[0] / "run"
    assert_same_run(reference, run_dir)  # 2 processes on CPU resume bit-exactly, too
    check_mlflow(run_dir, f"sqlite:///{tmp_path}/mlflow.db", 4)


@pytest.mark.slurm
@pytest.mark.parametrize("change,message", [
    ({"partition": "gpu-a100"}, "partition: 'gpu-a100' is not a partition"),
    ({"cpus_per_task": 64}, "cpus_per_task"),
    ({"nodes": 3}, "nodes: 3 asked for"),
    ({"mem": "4000G"}, "mem: 4000G asked for"),
    ({"time": None}, "missing key 'time'"),
    ({"time": "tomorrow"}, "time: 'tomorrow' is not a SLURM time"),
    # what only SLURM itself knows (node features, extra options): sbatch --test-only
    ({"constraint": "a100"}, "Invalid feature specification"),
    ({"extra_sbatch": {"gres": "gpu:1"}}, "Invalid generic resource"),
])
def test_bad_profile_fails_at_submit_time_and_queues_nothing(cluster, tmp_path, capsys, change, message):
    from cap.cli.submit import main

    data = {k: v for k, v in {**LOCAL, **change}.items() if v is not None}
    profile = tmp_path / "bad.yaml"
    profile.write_text(yaml.safe_dump(data))
    before = queued_jobs()
    code = main(["--cluster", str(profile), "--", "train", *TRAIN, "--out", str(tmp_path / "run")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not queued_jobs() - before, "a refused profile must leave no job in the queue"
    assert not (tmp_path / "run").exists()


SWEEP = {"name": "slurm-sweep", "base": {"config": str(ROOT / "configs" / "smoke.yaml"), "overrides": [
    "data.train_subset=300", "data.test_subset=200", "train.epochs=1", "prune.warmup_epochs=0.5",
    "prune.check_every=5", "prune.eta=0.05", "prune.bn_batches=2", "train.threads=1", "train.progress=false"]},
    "space": {"prune.tau": {"grid": [0.5, 1.0, 2.0]}}, "search": "random", "num_samples": 1,
    "resources": {"cpus": 1}, "max_concurrent": 2, "storage": "sweeps_out",
    "tracking": {"experiment": "cap-slurm-sweep"}, "seed": 0}


@pytest.mark.slurm
@pytest.mark.ray
def test_sweep_job_runs_three_trials_each_an_mlflow_run(cluster, tmp_path):
    pytest.importorskip("cap.cli.sweep")
    from mlflow.tracking import MlflowClient

    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(SWEEP))
    done = cap_submit(tmp_path, "--cluster", str(ROOT / "slurm" / "local.yaml"), "--wait", "--", "sweep",
                      "sweep.yaml", timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert re.search(r"job \d+ COMPLETED", done.stdout)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("cap-slurm-sweep")
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if "prune.tau" in r.data.params and r.info.status == "FINISHED"]
    assert sorted(float(r.data.params["prune.tau"]) for r in trials) == [0.5, 1.0, 2.0]
    assert all(r.data.metrics.get("test_acc", 0) > 0 for r in trials)
