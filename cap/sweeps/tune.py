"""`cap sweep`: Ray Tune over the trade-off parameters; every trial is a full cap run and an MLflow run.

Layout of a sweep's folder (spec.storage / spec.name):
    <Ray's experiment state>     what Tuner.restore needs to resume an interrupted sweep
    runs/<trial_id>/             the trial's cap run folder (config.yaml, summary.json, checkpoints/, train.log,
                                 trial.json with its attempts)
    sweep.json                   the MLflow parent run and the spec's fingerprint
    sweep_results.csv / .json    one row per trial: values, status, attempts, error, final metrics
    pareto/                      pareto.csv, pareto.png, pareto.html of the finished trials

A failed trial is retried (`max_failures` times; a retry continues from the trial's last checkpoint)
and then reported in sweep_results and on the parent run, and the command exits 1. Running the same
command again after an interruption (Ctrl-C, SIGUSR1, a killed driver) restores the sweep: finished
trials are kept, unfinished ones continue from their checkpoints.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cap.engine.console import console
from cap.sweeps import SUPERSEDED_TAG, SWEEP_TAG
from cap.sweeps.spec import OBJECTIVES, SweepSpec
from cap.tracking import Store, recorded_run_id, resolve_uri, retire_state, run_state
from cap.tracking.links import ui_hint
from cap.tracking.uri import is_server

Log = Callable[[str], Any]
SWEEP_FILE = "sweep.json"
RESULTS = "sweep_results"
EXIT_INTERRUPTED = 130


class SweepError(RuntimeError):
    """The sweep cannot start or continue (tracking store unreachable, folder of another spec)."""


@dataclass
class TrialContext:
    """What every trial needs besides its sampled values (passed to the workers once, by Ray)."""

    base: dict
    runs_dir: str
    cwd: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    sweep_name: str
    threads: int


def _metrics(record: dict) -> dict[str, Any]:
    """What a trial reports to Ray each epoch: the objectives and the scheduler's metrics."""
    return {"epoch": record["epoch"], "test_acc": record["test_acc"], "test_loss": record["test_loss"],
            "train_loss": record["train_loss"], "mac_reduction": 1 - record["mac_ratio"],
            "param_reduction": 1 - record["param_ratio"], "layers_kept": record["layers_kept"],
            "units_kept": record["units_kept"]}


def _supersede(run_dir: Path, uri: str) -> None:
    """A retry that starts over: end the earlier attempt's MLflow run, so only one run counts per trial."""
    state = run_state(run_dir)
    if state is None:
        return
    run_id = state.get("run_id")
    if run_id:
        store = Store(uri)
        store.set_tags(run_id, {SUPERSEDED_TAG: "true"})
        if store.run_info(run_id).status == "RUNNING":
            store.terminate(run_id, "KILLED")
    retire_state(run_dir, f"superseded-{int(time.time())}")


def run_trial(values: dict[str, Any], context: TrialContext) -> None:
    """Ray Tune function trainable: one cap run with `values` applied to the base experiment."""
    from ray import tune

    from cap.engine.run import resume, run
    from cap.sweeps.spec import with_values

    os.chdir(context.cwd)  # Ray starts trials in their own folder; relative paths of the base config are the user's
    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(context.runs_dir) / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    info_file = run_dir / "trial.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {"values": values, "attempts": []}
    info["attempts"].append({"pid": os.getpid(), "started": time.time()})
    info_file.write_text(json.dumps(info, indent=2))

    cfg = with_values(context.base, {
        **values, "tracking.uri": context.tracking_uri, "tracking.experiment": context.experiment,
        "tracking.parent_run_id": context.parent_run_id, "tracking.run_name": f"{context.sweep_name}-{trial_id}",
        "train.progress": False, "train.threads": context.base["train"].get("threads") or context.threads})
    log_file = (run_dir / "train.log").open("a")

    def log(message: str) -> None:
        print(message, file=log_file, flush=True)

    epochs = cfg.train.epochs

    def on_epoch(record: dict) -> None:
        if record["epoch"] < epochs:  # the last epoch is reported with the final summary below
            tune.report(_metrics(record))

    try:
        if (run_dir / "summary.json").exists():  # finished before the driver recorded it
            summary = json.loads((run_dir / "summary.json").read_text())
        elif (run_dir / "checkpoints" / "last.pt").exists() or (run_dir / "checkpoints" / "prev.pt").exists():
            log(f"attempt {len(info['attempts'])}: continuing from the checkpoint")
            summary = resume(run_dir, log=log, on_epoch=on_epoch)
        else:
            _supersede(run_dir, context.tracking_uri)
            # a retry that starts over: the earlier attempt's files (no checkpoint) go
            summary = run(cfg, run_dir, log=log, on_epoch=on_epoch, overwrite=True)
    except BaseException as exc:
        log(f"attempt {len(info['attempts'])} failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        log_file.close()
    last = json.loads((run_dir / "history.json").read_text())[-1]
    tune.report({**_metrics(last), "train_seconds": summary["train_seconds"],
                 "mlflow_run_id": summary.get("mlflow_run_id") or "", "run_dir": str(run_dir)})


# ----------------------------------------------------------------------------------------- driver


def _fingerprint(spec: SweepSpec) -> str:
    """What must not change between a sweep and its resumption: the space and the base experiment."""
    space = [(d.key, d.kind, d.values) for d in spec.space]
    text = json.dumps({"space": space, "search": spec.search, "num_samples": spec.num_samples,
                       "base": spec.base}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _parent_run(spec: SweepSpec, store: Store, state: dict | None, log: Log) -> str:
    """The sweep's MLflow parent run: created on the first start, reused when the sweep resumes."""
    try:
        if state and state.get("parent_run_id"):
            if store.run_info(state["parent_run_id"]).status != "RUNNING":
                store.reopen(state["parent_run_id"])
            return state["parent_run_id"]
        _, run_id = store.create_run(spec.experiment, spec.name,
                                     tags={SWEEP_TAG: spec.name, "cap.sweep_spec": str(spec.path.resolve()),
                                           "cap.sweep_dir": str(spec.experiment_dir)})
    except Exception as exc:  # noqa: BLE001 - any store failure: say which store and stop before any trial
        raise SweepError(f"MLflow tracking store {store.uri} is not usable for the sweep's parent run: "
                         f"{exc}") from exc
    store.log_params(run_id, {
        "search": spec.search, "num_samples": spec.num_samples, "max_failures": spec.max_failures,
        "cpus_per_trial": spec.cpus_per_trial, "gpus_per_trial": spec.gpus_per_trial,
        "base_config": str(spec.base_config), "base_overrides": " ".join(spec.base_overrides),
        **{f"space.{d.key}": f"{d.kind} {d.values}" for d in spec.space}})
    log(f"MLflow parent run {run_id} in experiment '{spec.experiment}' at {store.uri}")
    return run_id


def _tuner(spec: SweepSpec, context: TrialContext, restore: bool):
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})
    if restore:
        return tune.Tuner.restore(str(spec.experiment_dir), trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    search_alg, scheduler = None, None
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=list(OBJECTIVES), mode=["max"] * len(OBJECTIVES), seed=spec.seed)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=spec.seed)
    if spec.scheduler is not None:
        from ray.tune.schedulers import ASHAScheduler

        s = spec.scheduler
        scheduler = ASHAScheduler(time_attr="epoch", metric=s.metric, mode="max" if s.metric == "test_acc" else "min",
                                  max_t=spec.base["train"]["epochs"], grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor)
    return tune.Tuner(
        trainable, param_space={d.key: d.ray() for d in spec.space},
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=spec.num_samples,
                                    max_concurrent_trials=spec.max_concurrent, reuse_actors=False),
        run_config=tune.RunConfig(name=spec.name, storage_path=str(spec.storage), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures)))


def _require_token() -> None:
    """This Ray's gRPC servers (gcs_server, raylets, workers) listen on every interface, whatever node address
    they are given, so the sweep's own Ray asks every caller for a fresh token that only its processes hold (in
    their environment, never in a file under ~/.ray). An RAY_AUTH_MODE the user set is left as it is."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    _reread_auth_settings()


def _reread_auth_settings() -> None:
    """Ray read RAY_AUTH_MODE when it was imported; make it read the environment again (as ray's own token
    setup does), so that a mode set since then applies."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _init_ray(address: str | None, spec: SweepSpec, log: Log) -> None:
    import ray

    if address:  # an existing cluster: its own authentication applies (RAY_AUTH_MODE/RAY_AUTH_TOKEN of the user,
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # or the SLURM sweep job's, cap.launch.jobs)
        _reread_auth_settings()
        ray.init(address=address, log_to_driver=False)
        log(f"Ray cluster at {address}: {ray.cluster_resources()}")
        return
    _require_token()
    cpus = int(os.environ.get("SLURM_CPUS_ON_NODE") or len(os.sched_getaffinity(0)))
    # "local": a Ray of its own, even where /tmp/ray names another cluster (a `ray start` of earlier, gone or not)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    log(f"local Ray with {cpus} CPUs: up to {int(cpus // spec.cpus_per_trial)} trials at once"
        + (f" (max_concurrent {spec.max_concurrent})" if spec.max_concurrent else ""))


def _trial_rows(spec: SweepSpec) -> tuple[list[dict[str, Any]], int]:
    """One row per trial from Ray's saved state and the trials' run folders; and how many are unfinished."""
    from ray import tune
    from ray.tune.experiment import Trial

    rows, unfinished = [], 0
    for trial in tune.ExperimentAnalysis(str(spec.experiment_dir)).trials:
        run_dir = spec.experiment_dir / "runs" / trial.trial_id
        info = json.loads((run_dir / "trial.json").read_text()) if (run_dir / "trial.json").exists() else {}
        metrics = trial.last_result or {}
        if trial.status not in (Trial.TERMINATED, Trial.ERROR):
            unfinished += 1
        error = trial.get_pickled_error() or trial.get_error() if trial.status == Trial.ERROR else None
        status = ("finished" if (run_dir / "summary.json").exists() else "error" if trial.status == Trial.ERROR
                  else "stopped" if trial.status == Trial.TERMINATED else trial.status.lower())
        rows.append({"trial_id": trial.trial_id, **{d.key: trial.config.get(d.key) for d in spec.space},
                     "status": status, "attempts": len(info.get("attempts", [])),
                     "error": "" if error is None else _error_line(error),
                     **{k: metrics.get(k) for k in ("epoch", *OBJECTIVES, "train_seconds", "mlflow_run_id")},
                     "run_dir": str(run_dir)})
    return sorted(rows, key=lambda r: r["trial_id"]), unfinished


def _error_line(error: BaseException | str) -> str:
    text = str(error).strip().splitlines()
    # Ray wraps the trial's exception; its last line is the original "Type: message"
    lines = [line for line in text if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def _write_results(rows: list[dict[str, Any]], folder: Path) -> Path:
    path = folder / f"{RESULTS}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial_id"])
        writer.writeheader()
        writer.writerows(rows)
    (folder / f"{RESULTS}.json").write_text(json.dumps(rows, indent=2, default=str))
    return path


def _close_stopped_runs(rows: list[dict[str, Any]], store: Store) -> None:
    """Trials the scheduler stopped early were killed by Ray mid-run: end their MLflow runs as KILLED."""
    for row in rows:
        if row["status"] == "finished":
            continue
        run_id = recorded_run_id(Path(row["run_dir"]))
        if run_id and store.run_info(run_id).status == "RUNNING":
            store.set_tags(run_id, {"cap.stopped": row["status"]})
            store.terminate(run_id, "KILLED" if row["status"] == "stopped" else "FAILED")


def run_sweep(spec: SweepSpec, address: str | None = None, log: Log = console) -> tuple[int, list[dict[str, Any]]]:
    """Run (or resume) the sweep; returns (exit status, one row per trial). 0: all trials finished."""
    from ray import tune

    uri = resolve_uri(spec.tracking_uri)
    store = Store(uri)
    folder = spec.experiment_dir
    state_file = folder / SWEEP_FILE
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    restore = tune.Tuner.can_restore(str(folder))
    fingerprint = _fingerprint(spec)
    if state and state.get("fingerprint") != fingerprint:
        raise SweepError(f"{folder} holds a sweep started from a different space or base experiment than "
                         f"{spec.path}; give the sweep a new name, or move that folder away")
    if restore and state is None:
        raise SweepError(f"{folder} holds Ray state but no {SWEEP_FILE}; it is not a cap sweep folder")
    if state and state.get("tracking_uri") != uri:
        raise SweepError(f"{folder} logs to {state.get('tracking_uri')}, not {uri}; resume it with that store")
    parent = _parent_run(spec, store, state, log)
    folder.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri, "experiment": spec.experiment,
                                      "fingerprint": fingerprint, "spec": str(spec.path.resolve())}, indent=2))
    if restore:
        log(f"resuming the sweep in {folder}: finished trials are kept")

    _init_ray(address, spec, log)
    context = TrialContext(base=spec.base, runs_dir=str(folder / "runs"), cwd=os.getcwd(),
                           tracking_uri=uri, experiment=spec.experiment, parent_run_id=parent,
                           sweep_name=spec.name, threads=max(1, int(spec.cpus_per_trial)))
    import ray

    try:
        _tuner(spec, context, restore).fit()
    finally:
        ray.shutdown()
    rows, incomplete = _trial_rows(spec)
    results = _write_results(rows, folder)
    if incomplete > 0:  # interrupted: Ray saved its state; the parent run stays open for the resumption
        log(f"sweep interrupted with {incomplete} trial(s) unfinished; run the same command again to resume")
        return EXIT_INTERRUPTED, rows
    _close_stopped_runs(rows, store)

    failed = [r for r in rows if r["status"] == "error"]
    finished = [r for r in rows if r["status"] == "finished"]
    store.log_artifact(parent, results)
    store.log_artifact(parent, folder / f"{RESULTS}.json")
    store.log_metrics(parent, {"trials": len(rows), "trials_finished": len(finished), "trials_failed": len(failed)})
    if finished:
        from cap.sweeps.report import ParetoError, pareto_report

        try:
            pareto_report(uri, spec.experiment, parent, folder / "pareto", log=log)
        except ParetoError as exc:  # e.g. the trials' final records still wait in their tracking_pending files
            log(f"warning: no Pareto front yet ({exc}); run `cap pareto --experiment {spec.experiment} "
                f"--parent {parent}` once the runs are complete in the store")
    for row in failed:
        log(f"trial {row['trial_id']} failed after {row['attempts']} attempt(s): {row['error']} "
            f"(log: {row['run_dir']}/train.log)")
    store.terminate(parent, "FINISHED" if finished else "FAILED")
    log(f"{len(finished)}/{len(rows)} trials finished, {len(failed)} failed; results: {results}")
    log(ui_hint(uri, spec.experiment, store.find_experiment(spec.experiment) if is_server(uri) else None))
    return (1 if failed else 0), rows
