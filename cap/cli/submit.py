"""`cap submit --cluster slurm/x.yaml [--wait] -- train ...|sweep ...`: the same commands as SLURM jobs.

Everything that can be checked is checked before the job is queued: the profile (cap.launch.profile),
the training configuration (as `cap train` would), the sweep spec's existence. The run folder and the
MLflow store are fixed at submit time and made absolute, so the job logs where the user expects.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

USAGE = """cap submit --cluster PROFILE [--wait] [--logs DIR] -- COMMAND ...

COMMAND is what you would type after `cap`:
  train --config FILE [--out DIR] [key=value ...]   one training run, one task per GPU (or CPU worker)
  train --resume RUN_DIR                           continue a run folder as a job
  sweep SWEEP.yaml [options of cap sweep]          a Ray Tune sweep on the job's allocation"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cap submit", usage=USAGE,
        description="Submit `cap train` or `cap sweep` to SLURM through submitit. Prints the job id, the log "
                    "files and the MLflow store; with --wait follows the log and exits with the job's status "
                    "(0 only when it completed). Profiles: slurm/*.yaml, keys in docs/slurm.md.")
    parser.add_argument("--cluster", required=True, metavar="PROFILE", help="cluster profile YAML (slurm/*.yaml)")
    parser.add_argument("--wait", action="store_true", help="follow the job's log to its end; exit with its status")
    parser.add_argument("--logs", metavar="DIR",
                        help="submitit's folder (job script, logs, pickles); default RUN_DIR/slurm for train, "
                             "./slurm_logs for sweep")
    parser.add_argument("--name", help="SLURM job name (default cap-train / cap-sweep)")
    return parser


def _train_job(args: list[str]) -> tuple[Any, Path, str, str]:
    """(TrainJob, run folder, MLflow uri, experiment) from `cap train`'s own arguments."""
    from cap.cli import build_parser as cap_parser
    from cap.engine.config import ConfigError, load_config, to_dict
    from cap.engine.run_folder import check_run_folder, start_run_folder
    from cap.engine.saved_config import load_run_config, restore_config
    from cap.launch.jobs import TrainJob
    from cap.tracking import resolve_uri

    ns = cap_parser().parse_args(["train", *args])
    if ns.resume is not None:
        if ns.config or ns.out or ns.overrides:
            raise ConfigError("train --resume RUN_DIR takes no --config, --out or overrides")
        run_dir = Path(ns.resume).resolve()
        if not (run_dir / "config.yaml").is_file() and not ns.restore_config:
            raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)")
        if ns.restore_config:  # done here, once, not by every task of the job
            restore_config(run_dir)
        # validated, and a legacy one completed, as `cap train --resume` will read it in the job
        cfg = load_run_config(run_dir)
        return TrainJob(None, str(run_dir)), run_dir, resolve_uri(cfg.tracking.uri), cfg.tracking.experiment
    cfg = load_config(ns.config, ns.overrides)  # a bad key or value fails here, before anything is queued
    # the default store (./mlflow.db) is resolved against the submit directory, not wherever a node runs
    cfg.tracking.uri = resolve_uri(cfg.tracking.uri)
    from cap.engine.run import default_run_dir

    run_dir = Path(ns.out or default_run_dir(cfg)).resolve()
    check_run_folder(run_dir, ns.overwrite)  # refused before anything is queued
    if ns.overwrite:  # now, or the job would find the old run's checkpoints and resume it
        start_run_folder(run_dir, overwrite=True)
    return TrainJob(to_dict(cfg), str(run_dir)), run_dir, cfg.tracking.uri, cfg.tracking.experiment


def _sweep_job(args: list[str]):
    """SweepJob from `cap sweep`'s own arguments (parsed here, so that a bad one fails before anything is queued)."""
    from cap.cli.sweep import build_parser as sweep_parser
    from cap.engine.config import ConfigError
    from cap.launch.jobs import SweepJob

    if not args or args[0].startswith("-"):
        raise ConfigError("sweep needs a sweep spec: cap submit --cluster P -- sweep sweeps/x.yaml")
    ns = sweep_parser().parse_args(args)
    if ns.address is not None:
        raise ConfigError("sweep --address is set by the job (a Ray head inside the allocation); leave it out")
    spec = Path(ns.spec).resolve()
    if not spec.is_file():
        raise ConfigError(f"sweep spec {ns.spec} does not exist")
    # --storage, like the spec's own storage, is relative to the submit directory (where the job starts)
    return SweepJob(str(spec), str(Path(ns.storage).resolve()) if ns.storage else None)


def make_executor(profile, folder: Path, name: str, tasks_per_node: int, cpus_per_task: int):
    import submitit

    options = profile.sbatch_options(tasks_per_node, cpus_per_task)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=profile.max_requeues)
    executor.update_parameters(
        job_name=name, partition=options.pop("partition"), nodes=options.pop("nodes"),
        ntasks_per_node=options.pop("ntasks-per-node"), cpus_per_task=options.pop("cpus-per-task"),
        mem=options.pop("mem"), time=options.pop("time"), gpus_per_node=options.pop("gpus-per-node", None),
        account=options.pop("account", None), qos=options.pop("qos", None),
        constraint=options.pop("constraint", None), signal_delay_s=profile.signal_delay_s,
        setup=profile.setup or None, additional_parameters=options or None)
    return executor


def follow(job, poll_s: float = 3.0, out=sys.stdout) -> str:
    """Print task 0's log as it grows until the job is over (a requeued job goes on in the same files);
    returns SLURM's final state."""
    offsets: dict[Path, int] = {}

    def flush() -> None:
        for path in (job.paths.stdout, job.paths.stderr):
            path = Path(str(path).replace("%t", "0"))
            if path.exists() and path.stat().st_size > offsets.get(path, 0):
                with open(path, errors="replace") as f:
                    f.seek(offsets.get(path, 0))
                    out.write(f.read())
                    offsets[path] = f.tell()
                out.flush()

    while True:
        # fresh sacct states: submitit's own refresh backs off to 10 min, and a multi-task job's done()
        # does not pass force_check on to its tasks (a cancelled job would go unnoticed for minutes)
        job.watcher.update()
        if job.done():
            break
        flush()
        time.sleep(poll_s)
    flush()
    state = "UNKNOWN"
    for _ in range(60):  # the result files come before SLURM's final state (sacct, asked afresh each time)
        state = (job.get_info(mode="force").get("State") or "UNKNOWN").split()[0]
        if state not in ("RUNNING", "COMPLETING", "UNKNOWN", "PENDING", "REQUEUED"):
            break
        time.sleep(1)
    return state


def _report(job, state: str, run_dir: Path | None) -> int:
    import json

    from cap.launch.jobs import has_checkpoint

    try:
        job.results()  # raises the job's exception, or says why there is no result
    except Exception as exc:  # submitit's FailedJobError / UncompletedJobError carry the job's traceback
        print(f"job {job.job_id} {state}: {exc}", file=sys.stderr)
        if run_dir is not None and has_checkpoint(run_dir):
            print(f"it left a checkpoint; continue with: cap submit --cluster PROFILE -- train --resume {run_dir}",
                  file=sys.stderr)
        return 1
    print(f"job {job.job_id} {state}")
    if run_dir is not None and (run_dir / "summary.json").is_file():
        s = json.loads((run_dir / "summary.json").read_text())
        print(f"{run_dir}: test_acc {s['test_acc']:.4f}, blocks {s['layers_kept']}/{s['layers_total']}, "
              f"units {s['units_kept']}/{s['units_total']}, {s['epochs']} epochs")
    if run_dir is not None and (run_dir / "tracking.json").is_file():
        t = json.loads((run_dir / "tracking.json").read_text())
        print(f"MLflow run {t.get('run_id')} (experiment {t.get('experiment')}) at {t.get('uri')}")
    return 0 if state == "COMPLETED" else 1


def main(argv: list[str]) -> int:
    from cap.engine.config import ConfigError
    from cap.launch.profile import ProfileError, check_against_cluster, load_profile

    if "--" not in argv:
        if any(a in ("-h", "--help") for a in argv):
            build_parser().print_help()
            return 0
        print(f"usage: {USAGE}\nerror: put the command after `--`", file=sys.stderr)
        return 2
    cut = argv.index("--")
    args, command = build_parser().parse_args(argv[:cut]), argv[cut + 1:]
    if not command or command[0] not in ("train", "sweep"):
        print(f"usage: {USAGE}\nerror: the command after `--` must be train or sweep", file=sys.stderr)
        return 2
    try:
        profile = load_profile(args.cluster)
        run_dir = None
        if command[0] == "train":
            job_fn, run_dir, uri, experiment = _train_job(command[1:])
            tasks, cpus = profile.tasks_per_node, profile.cpus_per_task
            folder = Path(args.logs or run_dir / "slurm")
        else:  # one task per node; Ray shares the node's CPUs and GPUs among the trials
            job_fn = _sweep_job(command[1:])
            tasks, cpus = 1, profile.tasks_per_node * profile.cpus_per_task
            folder = Path(args.logs or "slurm_logs")
        check_against_cluster(profile, tasks, cpus)
    except (ProfileError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import submitit

    executor = make_executor(profile, folder.resolve(), args.name or f"cap-{command[0]}", tasks, cpus)
    try:
        job = executor.submit(job_fn)
    except submitit.core.utils.FailedJobError as exc:  # sbatch refused it (EnforcePartLimits and friends)
        print(f"error: SLURM refused the job: {exc}", file=sys.stderr)
        return 2
    log = Path(str(job.paths.stdout).replace("%t", "0"))
    print(f"submitted job {job.job_id}: {command[0]} on {profile.nodes} node(s) x {tasks} task(s), partition "
          f"{profile.partition}" + (f", run folder {run_dir}" if run_dir else ""))
    print(f"logs: {log} and {log.with_suffix('.err')} (task 0); all tasks: {folder.resolve()}")
    if command[0] == "train":
        print(f"MLflow: {uri}, experiment {experiment}; the run id is in {run_dir}/tracking.json once it starts")
    print(f"cancel: scancel {job.job_id}")
    if not args.wait:
        return 0
    return _report(job, follow(job), run_dir)
