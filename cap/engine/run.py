"""One training run: data, gated model, SGD, the pruner, evaluation of the deterministic network.

Runs as one process (`cap train`) or as one rank of a data-parallel job (`torchrun ... -m cap train`):
the model is wrapped in DistributedDataParallel, rebuilt after every surgery; the pruner averages
theta gradients over ranks and checks that all ranks agree before removing anything. Rank 0 writes
the run folder, the checkpoints and the MLflow run. `resume(run_dir)` continues from the newest good
checkpoint; on one process the result is bit-identical to a run that was never stopped.

The steps themselves are cap.engine.loop's; the run's modules, position and checkpoint schema are
cap.engine.state's; this module sets a run up, drives its epochs and stops it.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from cap.core.arch import architecture
from cap.core.bn import recalibrate_bn
from cap.core.sync import digest_tensors
from cap.engine.checkpoint import CHECKPOINT_DIR, CheckpointError, StopRequest
from cap.engine.config import Config, TrainConfig, to_dict
from cap.engine.console import console
from cap.engine.distributed import DistContext, init_distributed
from cap.engine.loop import EPOCH_METRICS, averages, epoch_line, evaluate, make_scheduler, new_meter, train_one_epoch
from cap.engine.outputs import RunResult, write_outputs
from cap.engine.run_folder import RunFolderError, check_run_folder, start_run_folder
from cap.engine.saved_config import load_run_config
from cap.engine.state import Parts, Progress, build_parts, fresh_progress, load, restore, save, snapshot

__all__ = ["CHECKPOINT_DIR", "EpochHook", "Preempted", "TrainingDiverged", "default_run_dir", "make_scheduler",
           "peak_memory_mb", "pick_device", "resume", "run"]

Log = Callable[[str], None]
EpochHook = Callable[[dict], Any]
"""called on rank 0 with each finished epoch's history record (a sweep reports it to Ray Tune)"""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: going on would only burn compute on a broken network."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint; `cap train --resume` continues it."""

    def __init__(self, run_dir: Path, signal_name: str, epoch: int, step: int) -> None:
        super().__init__(f"stopped by {signal_name} in epoch {epoch + 1} after step {step}; checkpoint written; "
                         f"continue with: cap train --resume {run_dir}")
        self.run_dir = run_dir
        self.signal_name = signal_name  # a launcher requeues on its own signal only (cap.launch.jobs)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device("cpu")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.model.name}-{cfg.data.name}-tau{cfg.prune.tau:g}"


# ---------------------------------------------------------------------------- setting a run up
def _start_process(t: TrainConfig) -> tuple[DistContext, torch.device]:
    """This process's place in the job (torchrun's environment, if any), its device, and torch's settings."""
    ctx = init_distributed(pick_device(t.device).type)
    device = pick_device(t.device, ctx.local_rank)
    _configure_torch(t)
    return ctx, device


def _configure_torch(t: TrainConfig) -> None:
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _silent(message: str) -> None:  # the log of every rank but 0: only rank 0 talks
    return None


def _check_resumable(run_dir: Path) -> None:
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        raise CheckpointError(f"{run_dir} has no {CHECKPOINT_DIR}/ folder: nothing to resume (was it started with "
                              "train.checkpoint=false, or is it not a run folder?)")


def _resume_payload(run_dir: Path, cfg: Config, log: Log) -> dict[str, Any]:
    """The newest good checkpoint of `run_dir` written with `cfg`, in the current schema."""
    try:
        saved, path = load(run_dir / CHECKPOINT_DIR, log, cfg)
    except CheckpointError as exc:
        if "belongs to another run" not in str(exc):
            raise
        raise CheckpointError(f"{exc}. If {run_dir / 'config.yaml'} was edited, put back the configuration "
                              f"the run was started with: cap train --resume {run_dir} --restore-config") from exc
    position = saved["position"]
    if not _finished(saved, cfg, run_dir):
        log(f"resuming {run_dir} from {path}: epoch {position['epoch'] + 1}, step {position['step_in_epoch']}")
    return saved


def _finished(saved: dict[str, Any], cfg: Config, run_dir: Path) -> bool:
    """All epochs done and the results written: there is nothing to resume."""
    return saved["position"]["epoch"] >= cfg.train.epochs and (run_dir / "summary.json").is_file()


def _shared_run_dir(ctx: DistContext, out_dir: Path | None, cfg: Config, overwrite: bool) -> Path:
    """Rank 0's run folder on every rank (a default name holds the time, which ranks may see differently),
    checked on rank 0 before any work (cap.engine.run_folder); every rank raises its refusal."""
    run_dir = out_dir if out_dir is not None else default_run_dir(cfg)
    problem = None
    if ctx.is_main:
        try:
            check_run_folder(run_dir, overwrite)
        except RunFolderError as exc:
            problem = str(exc)
    run_dir, problem = ctx.broadcast_object((str(run_dir), problem))
    if problem is not None:
        raise RunFolderError(problem)
    return Path(run_dir)


def _write_config(ctx: DistContext, run_dir: Path, cfg: Config, overwrite: bool) -> None:
    if ctx.is_main:
        start_run_folder(run_dir, overwrite)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _open_tracker(cfg: Config, out_dir: Path, ctx: DistContext, resume_id: str | None, log: Log):
    from cap.tracking import NullTracker, open_tracker

    if not (ctx.is_main and cfg.tracking.enabled):
        return NullTracker()
    if resume_id is not None:
        try:
            return open_tracker(cfg.tracking, out_dir, resume_run_id=resume_id, log=log)
        except RuntimeError as exc:  # e.g. the run was deleted from the store: training matters more
            log(f"warning: cannot continue MLflow run {resume_id} ({exc}); logging the rest to a new run")
    return open_tracker(cfg.tracking, out_dir, log=log)


def _log_params_of_new_run(tracker, cfg: Config, ctx: DistContext, previous_id: str | None) -> None:
    if tracker.run_id is not None and tracker.run_id != previous_id:  # a new MLflow run
        from cap.tracking import flatten

        tracker.log_params({**flatten(to_dict(cfg)), "world_size": ctx.world_size,
                            "global_batch_size": cfg.data.batch_size * ctx.world_size})


def _start_line(run_dir: Path, parts: Parts) -> str:
    cfg, data, ctx = parts.cfg, parts.data, parts.ctx
    return (f"run {run_dir}: {cfg.model.name} on {data.name} ({data.train_size} train / {data.test_size} test), "
            f"tau={cfg.prune.tau:g} alpha={cfg.prune.alpha:g} beta={cfg.prune.beta:g}, {cfg.train.epochs} epochs "
            f"of {parts.steps} steps, device {parts.device}"
            + (f", {ctx.world_size} processes ({ctx.backend})" if ctx.enabled else ""))


# ---------------------------------------------------------------------------- epochs
def _preempt(parts: Parts, progress: Progress, run_dir: Path, stop: StopRequest, epoch: int, step: int,
             checkpointed: bool = False) -> None:
    """Checkpoint (unless that is done) and raise Preempted."""
    if not checkpointed:
        save(parts, progress, run_dir / CHECKPOINT_DIR)
    raise Preempted(run_dir, stop.signal_name or "a signal on another rank", epoch, step)


def _train_epoch(parts: Parts, progress: Progress, stop: StopRequest, run_dir: Path) -> None:
    """The remaining steps of the current epoch; on a stop request, checkpoint and raise Preempted."""
    cfg, pruner = parts.cfg, parts.pruner
    loader = parts.data.train
    loader.epoch, loader.start_batch = progress.epoch, progress.step_in_epoch

    def after_step(done: int) -> bool:
        progress.step_in_epoch = done
        if pruner.sampling and pruner.state.step % cfg.prune.check_every == 0:
            snapshot(parts, progress)
        return parts.ctx.any(stop.requested, parts.device)

    stopped = train_one_epoch(
        parts.model, parts.optimizer, parts.scheduler, loader, parts.device, steps=parts.steps,
        meter=progress.meter, start=progress.step_in_epoch, ddp=parts.ddp, scaler=parts.scaler, pruner=pruner,
        amp_dtype=parts.amp_dtype, channels_last=cfg.train.channels_last, grad_clip=cfg.train.grad_clip,
        on_surgery=parts.after_surgery, after_step=after_step, desc=f"epoch {progress.epoch + 1}/{cfg.train.epochs}",
        progress=cfg.train.progress and parts.ctx.is_main)
    if stopped:
        _preempt(parts, progress, run_dir, stop, progress.epoch, progress.step_in_epoch)


def _check_finite(parts: Parts, epoch: int, nonfinite: int, log: Log) -> None:
    steps = parts.steps * parts.ctx.world_size
    # without fp16's scaler a non-finite loss has already written NaN into the weights; with it, that step
    # was skipped, and only a run that overflows most of the time is lost (checked once an epoch: the
    # losses are on the host already, no extra sync)
    tolerated = steps // 2 if parts.scaler.is_enabled() else 0
    if nonfinite > tolerated:
        raise TrainingDiverged(f"training loss not finite in epoch {epoch + 1} ({nonfinite} of {steps} "
                               f"steps): the run diverged (train.lr={parts.cfg.train.lr:g}; try a lower rate or "
                               "train.grad_clip)")
    if nonfinite:
        log(f"warning: {nonfinite} training steps of epoch {epoch + 1} had a non-finite loss")


def _finish_epoch(parts: Parts, progress: Progress, run_dir: Path, log: Log) -> dict:
    """Divergence check, hardening check, BN re-estimation, evaluation, records, checkpoint."""
    m, pruner = progress.meter, parts.pruner
    keys = ("loss_sum", "correct", "seen", "nonfinite_steps", "loss_seen")
    summed = parts.ctx.sum(torch.tensor([m[k] for k in keys], dtype=torch.float64, device=parts.device)).tolist()
    totals = dict(zip(keys, summed, strict=True))
    _check_finite(parts, progress.epoch, int(totals["nonfinite_steps"]), log)
    events = pruner.end_epoch(progress.epoch)
    if events:
        parts.after_surgery()
    pruner.deterministic()
    recalibrate_bn(parts.model, parts.data.calib(parts.cfg.prune.bn_batches), parts.device)
    result = evaluate(parts.model, parts.data.test, parts.device, parts.ctx, parts.amp_dtype)
    record = {"epoch": progress.epoch + 1, **averages(totals), **result, **pruner.stats(),
              "epoch_seconds": m["seconds"],
              "blocks_removed": m["blocks_removed"] + sum(e.kind == "block" for e in events),
              "hardened": pruner.state.hardened}
    progress.history.append(record)
    snapshot(parts, progress)
    progress.epoch, progress.step_in_epoch, progress.meter = progress.epoch + 1, 0, new_meter()
    if parts.cfg.train.checkpoint:
        save(parts, progress, run_dir / CHECKPOINT_DIR)
    return record


def _train_epochs(parts: Parts, progress: Progress, run_dir: Path, tracker, log: Log,
                  on_epoch: EpochHook | None) -> None:
    """Every epoch left; on SIGTERM/SIGUSR1/SIGUSR2 (any rank), checkpoint and raise Preempted."""
    t, ctx = parts.cfg.train, parts.ctx
    with StopRequest() as stop:
        while progress.epoch < t.epochs:
            _train_epoch(parts, progress, stop, run_dir)
            record = _finish_epoch(parts, progress, run_dir, log)
            log(epoch_line(record, t.epochs, parts.pruner.enabled and parts.pruner.state.hardened))
            tracker.log_metrics({k: float(record[k]) for k in EPOCH_METRICS}, step=record["epoch"])
            if on_epoch is not None and ctx.is_main:
                on_epoch(record)
            if ctx.any(stop.requested, parts.device) and progress.epoch < t.epochs:
                # _finish_epoch wrote one only with train.checkpoint: the signal still gets its checkpoint
                _preempt(parts, progress, run_dir, stop, progress.epoch - 1, parts.steps, t.checkpoint)


def _result(parts: Parts, progress: Progress, run_dir: Path, digests: list[str]) -> RunResult:
    pruner, state = parts.pruner, parts.pruner.state
    return RunResult(
        out_dir=run_dir, cfg=parts.cfg, stats=pruner.stats(),
        arch=architecture(parts.model, parts.cfg.model.name, parts.kwargs), state_dict=parts.model.state_dict(),
        history=progress.history, trajectory=progress.trajectory, dataset=parts.data.name,
        steps_per_epoch=parts.steps, world_size=parts.ctx.world_size, pruning=pruner.enabled,
        hardened_at_step=state.harden_step, theta_undecided_at_harden=state.undecided_at_harden,
        theta_locked_at_harden=state.locked_at_harden, theta_steps_skipped=int(pruner.skipped_steps),
        prune_events=[vars(e) for e in state.events], tracking_run_id=progress.tracking_run_id,
        rank_digests=digests, peak_memory_mb=peak_memory_mb(parts.device))


def _finish(parts: Parts, progress: Progress, run_dir: Path, tracker, log: Log) -> dict:
    """The ranks must end with the same network (the digests go into the summary as evidence); rank 0 writes
    the result files."""
    digests = parts.ctx.agree("the final weights", digest_tensors(list(parts.model.state_dict().values())))
    summary = write_outputs(_result(parts, progress, run_dir, digests), tracker, log) if parts.ctx.is_main else {}
    tracker.finish()
    hint = None if parts.cfg.tracking.parent_run_id else tracker.ui_hint()  # a sweep's trial: the sweep says it
    if hint:
        log(hint)
    parts.ctx.barrier()
    return summary


# ---------------------------------------------------------------------------- a run, start to end
def _train_in(ctx: DistContext, device: torch.device, cfg: Config, out_dir: Path | None, resume_dir: Path | None,
              log: Log, on_epoch: EpochHook | None, opened: list, overwrite: bool) -> dict:
    if resume_dir is not None:
        saved, run_dir = _resume_payload(resume_dir, cfg, log), resume_dir
        if _finished(saved, cfg, run_dir):
            log(f"{run_dir} has finished all {cfg.train.epochs} epochs: nothing to resume (results in "
                f"{run_dir / 'summary.json'})")
            return json.loads((run_dir / "summary.json").read_text())
    else:
        saved, run_dir = None, _shared_run_dir(ctx, out_dir, cfg, overwrite)  # a bad --out fails before any work
    parts = build_parts(cfg, ctx, device)  # builds the data first: bad data fails here
    if saved is not None:
        progress = restore(parts, saved)
    else:  # a resumed run keeps the config.yaml it was started with
        progress = fresh_progress(parts)
        _write_config(ctx, run_dir, cfg, overwrite)
    tracker = _open_tracker(cfg, run_dir, ctx, progress.tracking_run_id, log)
    opened.append(tracker)
    _log_params_of_new_run(tracker, cfg, ctx, progress.tracking_run_id)
    progress.tracking_run_id = tracker.run_id
    log(_start_line(run_dir, parts))
    _train_epochs(parts, progress, run_dir, tracker, log, on_epoch)
    return _finish(parts, progress, run_dir, tracker, log)


def _train(cfg: Config, out_dir: Path | None, log: Log, resume_dir: Path | None = None,
           on_epoch: EpochHook | None = None, overwrite: bool = False) -> dict:
    ctx, device = _start_process(cfg.train)
    log = log if ctx.is_main else _silent
    opened: list = []  # the tracker once it is open: a run that does not finish ends it as KILLED or FAILED
    try:
        return _train_in(ctx, device, cfg, out_dir, resume_dir, log, on_epoch, opened, overwrite)
    except Preempted:
        raise  # the MLflow run stays open: the resumed job continues it
    except BaseException as exc:
        for tracker in opened:
            tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        ctx.close()


def run(cfg: Config, out_dir: Path | str | None = None, log: Log = console, on_epoch: EpochHook | None = None,
        overwrite: bool = False) -> dict:
    """Train one model as configured; write config.yaml, summary.json, history.json, model.pt, plots, checkpoints.
    A folder that holds a run already is refused, unless `overwrite` (its run's files are removed first)."""
    return _train(cfg, Path(out_dir) if out_dir is not None else None, log, on_epoch=on_epoch, overwrite=overwrite)


def resume(run_dir: Path | str, log: Log = console, on_epoch: EpochHook | None = None) -> dict:
    """Continue the run in `run_dir` from its newest good checkpoint, with the configuration it was started with
    (a finished run: its summary, nothing trained)."""
    run_dir = Path(run_dir)
    _check_resumable(run_dir)
    return _train(load_run_config(run_dir), run_dir, log, resume_dir=run_dir, on_epoch=on_epoch)
