"""What a SLURM job runs: `TrainJob` (one task per GPU or CPU worker, DDP from submitit's environment)
and `SweepJob` (Ray Tune on top of the job's allocation).

Both are submitit Checkpointables: when SLURM warns of the time limit or a preemption with SIGUSR2,
submitit calls `checkpoint()`, pickles what it returns and requeues the job. A TrainJob lets the
trainer act first: cap's StopRequest catches SIGUSR2 like SIGTERM, every rank stops at the same step
boundary, rank 0 writes checkpoints/last.pt, and only then is submitit's handler (restored by the
trainer) asked to requeue. The requeued job sees the checkpoint and resumes the run folder; the same
happens when SLURM itself requeues (scontrol requeue, a preemption sends SIGTERM): every start of a
TrainJob continues from the newest checkpoint there is.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from cap.launch import EXIT_PREEMPTED

RESUME_SIGNAL = "SIGUSR2"  # submitit's preemption/time-limit signal (SLURM --signal=USR2@delay)


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run folder holds a checkpoint to continue from (a started TrainJob resumes it)."""
    from cap.engine.checkpoint import CHECKPOINT_DIR

    return any((run_dir / CHECKPOINT_DIR).glob("*.pt"))


def _stop_after_checkpoint(signal_name: str | None) -> None:
    """The trainer has written its checkpoint on every rank's behalf; leave the job so that it is requeued.

    On SIGUSR2, rank 0 hands over to submitit's handler (checkpoint() -> requeue -> exit). On SIGTERM, SLURM
    is already ending the job (scontrol requeue, preemption, scancel): just leave. SystemExit, not an
    exception, so that submitit writes no result file and the client keeps waiting for the requeued job."""
    rank = int(os.environ.get("RANK", "0"))
    handler = signal.getsignal(signal.SIGUSR2)
    if rank == 0 and signal_name == RESUME_SIGNAL and callable(handler):
        handler(signal.SIGUSR2, None)  # raises UncompletedJobError when submitit refuses (too many requeues)
    sys.exit(EXIT_PREEMPTED)


class TrainJob(submitit.helpers.Checkpointable):
    """`cap train` as one task of a SLURM job; `config` is the resolved configuration (None: resume only)."""

    def __init__(self, config: dict[str, Any] | None, run_dir: str) -> None:
        self.config = config
        self.run_dir = run_dir

    def __call__(self) -> dict:
        import torch

        from cap.engine.config import build_config
        from cap.engine.run import Preempted, resume, run

        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM's; every task sees all GPUs of its
        # node, and the trainer picks cuda:LOCAL_RANK
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", torch.get_num_threads())))
        run_dir = Path(self.run_dir)
        try:
            if self.config is None or has_checkpoint(run_dir):
                return resume(run_dir)
            # `cap submit` checked the folder; a requeue before the first checkpoint starts the same run over
            return run(build_config(self.config), run_dir, overwrite=True)
        except Preempted as exc:
            _stop_after_checkpoint(exc.signal_name)
            raise  # not reached


# ---------------------------------------------------------------------------- sweeps
def _node_resources() -> dict[str, int]:
    cpus = int(os.environ.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)
    gpus = os.environ.get("SLURM_GPUS_ON_NODE") or ""
    return {"CPU": cpus, "GPU": int(gpus) if gpus.isdigit() else 0}


def _wait_for_port(host: str, port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the Ray head at {host}:{port} did not come up within {seconds:.0f} s")


def ray_start_command(head: str, port: int, resources: dict[str, int], is_head: bool) -> list[str]:
    """`ray start` for one node of the allocation; --block keeps it in the foreground, so that the job owns it
    and ending the process ends that node's Ray (never `ray stop`, which stops every Ray on the machine)."""
    ray = str(Path(sys.executable).parent / "ray")
    where = ["--head", f"--node-ip-address={head}", f"--port={port}"] if is_head else [f"--address={head}:{port}"]
    return [ray, "start", *where, f"--num-cpus={resources['CPU']}", f"--num-gpus={resources['GPU']}", "--block"]


def share_ray_token(folder: Path, job_id: str, is_head: bool) -> None:
    """Ray's servers listen on every interface (cap.sweeps.tune), so the job's Ray asks every caller for a token.
    Task 0 writes a fresh one, readable by the job's user only, into the job's log folder, which every node
    sees, before it starts the head; the other tasks read it once the head is up, so a requeued job never reads
    the previous start's. Ray takes it from the environment. A RAY_AUTH_MODE the user set is left as it is."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = folder / f".{job_id}_ray_token"
    if is_head:
        draft = path.with_name(f"{path.name}.{os.getpid()}")
        with os.fdopen(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(secrets.token_hex(32))
        os.replace(draft, path)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = path.read_text().strip()


def ray_environment() -> dict[str, str]:
    """The environment of the job's `ray start`: the task's, without Ray's 30 s drain on SIGTERM (it waits for
    Ray Serve replicas to quiesce; a sweep has none, and the job's end would wait for nothing)."""
    return {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **os.environ}


class SweepJob(submitit.helpers.Checkpointable):
    """`cap sweep SPEC [--storage DIR]` on the job's allocation: one task per node. On one node Ray starts inside
    run_sweep with the node's allocated CPUs; on several, task 0 starts a Ray head, the others join it, and task 0
    runs the sweep against it. A requeued SweepJob runs the same sweep again, which restores it."""

    def __init__(self, spec: str, storage: str | None = None) -> None:
        self.spec = spec
        self.storage = storage

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        resources = _node_resources()
        if env.num_nodes == 1:  # run_sweep starts Ray itself, sized by SLURM_CPUS_ON_NODE (the allocation)
            return self._sweep(None)
        head = env.hostnames[0]
        port = random.Random(f"ray-{env.job_id}").randint(20000, 60000)  # same on every task, differs per job
        if env.global_rank != 0:
            _wait_for_port(head, port, 300)
            share_ray_token(env.paths.folder, env.job_id, is_head=False)
            subprocess.run(ray_start_command(head, port, resources, is_head=False), env=ray_environment(), check=False)
            return 0
        if shutil.which(ray_start_command(head, port, resources, True)[0]) is None:
            raise RuntimeError("the `ray` command is not installed next to this Python")
        share_ray_token(env.paths.folder, env.job_id, is_head=True)
        ray_head = subprocess.Popen(ray_start_command(head, port, resources, is_head=True), env=ray_environment())
        try:
            _wait_for_port(head, port, 300)
            return self._sweep(f"{head}:{port}")
        finally:
            ray_head.terminate()
            ray_head.wait(timeout=120)

    def _sweep(self, address: str | None) -> int:
        """As `cap sweep`: a bad sweep file or store is status 2; any status but 0 fails the job."""
        from cap.engine.config import ConfigError
        from cap.sweeps.spec import load_sweep
        from cap.sweeps.tune import SweepError, run_sweep

        try:
            status, _ = run_sweep(load_sweep(self.spec, self.storage), address)
        except (ConfigError, SweepError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
        if status != 0:
            raise RuntimeError(f"cap sweep exited with status {status}")
        return status
