"""One training run: data, gated model, SGD, the pruner, evaluation of the deterministic network.

Runs as one process (`cap train`) or as one rank of a data-parallel job (`torchrun ... -m cap train`):
the model is wrapped in DistributedDataParallel, rebuilt after every surgery; the pruner averages
theta gradients over ranks and checks that all ranks agree before removing anything. Rank 0 writes
the run folder, the checkpoints and the MLflow run. `resume(run_dir)` continues from the newest good
checkpoint; on one process the result is bit-identical to a run that was never stopped.
"""

from __future__ import annotations

import inspect
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cap.core.arch import architecture
from cap.core.bn import recalibrate_bn
from cap.core.pruner import Pruner
from cap.core.sync import digest_tensors
from cap.data import DataError, build_data
from cap.data.bundle import derive_seed, loader_positions, restore_loader_positions
from cap.engine.checkpoint import CheckpointError, StopRequest, load_latest, save_checkpoint
from cap.engine.config import Config, ConfigError, build_config, to_dict, with_legacy_values
from cap.engine.distributed import DistContext, init_distributed
from cap.engine.outputs import write_outputs
from cap.models import ArchitectureError, build_from_architecture, create_model, load_architecture

_DDP_HAS_FORWARD_SYNC = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_DIR = "checkpoints"
Log = Callable[[str], None]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: going on would only burn compute on a broken network."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint; `cap train --resume` continues it."""

    def __init__(self, run_dir: Path, signal_name: str, epoch: int, step: int) -> None:
        super().__init__(f"stopped by {signal_name} in epoch {epoch + 1} after step {step}; checkpoint written; "
                         f"continue with: cap train --resume {run_dir}")
        self.run_dir = run_dir
        self.signal_name = signal_name  # a launcher requeues on its own signal only (cap.launch.jobs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device("cpu")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    t = cfg.train
    if t.schedule == "cosine":
        def factor(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    elif t.schedule == "step":
        def factor(step: int) -> float:
            return t.step_gamma ** sum(step >= m * total_steps for m in t.milestones)
    else:
        def factor(step: int) -> float:
            return 1.0
    warmup = round(t.lr_warmup_epochs * total_steps / t.epochs)
    if warmup <= 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def warmed(step: int) -> float:
        return factor(step) * min(1.0, (step + 1) / warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmed)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, ctx: DistContext | None = None,
             amp_dtype: torch.dtype | None = None) -> dict:
    """Loss and accuracy over `loader`; under data parallelism each rank scores its shard and the sums are
    all-reduced, so every test sample counts exactly once."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += len(labels)
    if ctx is not None:
        ctx.sum(totals)
    loss, correct, seen = totals.tolist()
    return {"test_loss": loss / seen, "test_acc": correct / seen, "test_seen": int(seen)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.model.name}-{cfg.data.name}-tau{cfg.prune.tau:g}"


def model_kwargs(cfg: Config, data) -> dict:
    kwargs = {"num_classes": data.num_classes, "in_channels": data.in_channels, "input_size": data.input_size}
    if cfg.model.name in ("resnet20", "resnet32", "resnet56", "resnet110"):
        kwargs["width"] = cfg.model.width
    return kwargs


def model_from_arch_file(path: str, name: str, kwargs: dict) -> nn.Module:
    """A freshly initialised gated model with the structure stored in `path` (model.pt or arch.json)."""
    try:
        spec = load_architecture(path)
    except ArchitectureError as exc:
        raise ConfigError(f"model.arch: {exc}") from exc
    if spec.get("name") != name or spec.get("kwargs") != kwargs:
        raise ConfigError(f"model.arch: {path} describes {spec.get('name')} {spec.get('kwargs')}, but this run "
                          f"builds {name} {kwargs} (model.name and the data must match)")
    try:
        return build_from_architecture({k: spec[k] for k in ("name", "kwargs", "blocks")})
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"model.arch: {path} is not a valid architecture: {exc}") from exc


def rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])


def _fresh_meter() -> dict[str, float]:
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0, "blocks_removed": 0, "nonfinite_steps": 0,
            "loss_seen": 0}


class Training:
    """The state of one run (modules, optimiser, pruner, position, records) and the steps that advance it."""

    def __init__(self, cfg: Config, out_dir: Path, ctx: DistContext, device: torch.device, log: Log) -> None:
        self.cfg, self.out_dir, self.ctx, self.device, self.log = cfg, out_dir, ctx, device, log
        t = cfg.train
        self.data = build_data(cfg.data, cfg.seed, ctx.rank, ctx.world_size,
                               device.index if device.type == "cuda" else None)
        seed_everything(cfg.seed)
        self.kwargs = model_kwargs(cfg, self.data)
        self.model = (model_from_arch_file(cfg.model.arch, cfg.model.name, self.kwargs) if cfg.model.arch
                      else create_model(cfg.model.name, **self.kwargs)).to(device)
        self._memory_format()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=t.lr, momentum=t.momentum,
                                         nesterov=t.nesterov, weight_decay=t.weight_decay)
        full = len(self.data.train)
        if full == 0:  # e.g. a shard smaller than one batch (last batches are dropped in training)
            raise DataError(f"{self.data.name}: {self.data.train_size} training images make no full batch of "
                            f"data.batch_size={cfg.data.batch_size} per process ({ctx.world_size} processes); "
                            "use a smaller batch, fewer processes or more data")
        self.steps = full if t.max_steps_per_epoch is None else min(full, t.max_steps_per_epoch)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.steps * t.epochs)
        self.pruner = Pruner(self.model, cfg.prune, self.steps, t.epochs, self.optimizer, sync=ctx,
                             seed=derive_seed(cfg.seed, "gates"))
        self.amp_dtype = AMP_DTYPES[t.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
        self.ddp = self._wrap()
        self.epoch, self.step_in_epoch = 0, 0
        self.meter = _fresh_meter()
        self.history: list[dict] = []
        self.trajectory: list[dict] = []
        self.tracking_run_id: str | None = None
        self.rank_digests: list[str] = []
        self._snapshot()

    # ------------------------------------------------------------------ model plumbing
    def _memory_format(self) -> None:
        if self.cfg.train.channels_last:  # in place: parameters keep their identity for the optimiser
            self.model.to(memory_format=torch.channels_last)

    def _wrap(self) -> nn.Module:
        """DDP over the current parameters; called again after surgery replaced some of them."""
        if not self.ctx.enabled:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # thetas are buffers kept equal by the pruner itself; BN statistics are re-estimated before use,
        # so no buffer needs broadcasting each forward (torch >= 2.14 renamed the switch)
        no_sync = {"forward_sync_buffers": False} if _DDP_HAS_FORWARD_SYNC else {"broadcast_buffers": False}
        return DistributedDataParallel(self.model, device_ids=ids, **no_sync)

    def _after_surgery(self) -> None:
        self._memory_format()
        self.ddp = self._wrap()

    def _snapshot(self) -> None:
        step = self.pruner.state.step
        self.trajectory.append({"step": step, "epoch": step / self.steps, "blocks": self.pruner.theta_summary()})

    # ------------------------------------------------------------------ training
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        t = self.cfg.train
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.pruner.before_forward()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.ddp(images)
            loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if t.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        scale = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        events = self.pruner.after_step(grad_scale=scale)
        if events:
            self._after_surgery()
        self.meter["blocks_removed"] += sum(e.kind == "block" for e in events)
        value = loss.item()
        if math.isfinite(value):
            self.meter["loss_sum"] += value * len(labels)
            self.meter["loss_seen"] += len(labels)
        else:  # fp16 overflows now and then (the scaler skips that step); a diverged run does it every step
            self.meter["nonfinite_steps"] += 1
        self.meter["correct"] += int((logits.argmax(1) == labels).sum())
        self.meter["seen"] += len(labels)

    def train_epoch(self, stop: StopRequest) -> None:
        """The remaining steps of the current epoch; on a stop request, checkpoint and raise Preempted."""
        loader = self.data.train
        loader.epoch, loader.start_batch = self.epoch, self.step_in_epoch
        self.model.train()
        bar = tqdm(total=self.steps, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{self.cfg.train.epochs}",
                   leave=False, disable=not (self.cfg.train.progress and self.ctx.is_main), file=sys.stderr)
        batches = iter(loader)
        start = time.perf_counter()
        try:
            while self.step_in_epoch < self.steps:
                self.train_step(*next(batches))
                self.step_in_epoch += 1
                if self.pruner.sampling and self.pruner.state.step % self.cfg.prune.check_every == 0:
                    self._snapshot()
                bar.set_postfix(loss=f"{self.meter['loss_sum'] / max(self.meter['loss_seen'], 1):.3f}")
                bar.update()
                if self.ctx.any(stop.requested, self.device):
                    self.meter["seconds"] += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save_checkpoint()
                    raise Preempted(self.out_dir, stop.signal_name or "a signal on another rank", self.epoch,
                                    self.step_in_epoch)
        finally:
            bar.close()
            self.meter["seconds"] += time.perf_counter() - start

    def finish_epoch(self) -> dict:
        """Hardening check, BN re-estimation, evaluation, records, checkpoint."""
        m = self.meter
        seen = self.ctx.sum(torch.tensor([m["loss_sum"], m["correct"], m["seen"], m["nonfinite_steps"],
                                          m["loss_seen"]], dtype=torch.float64, device=self.device)).tolist()
        nonfinite, steps = int(seen[3]), self.steps * self.ctx.world_size
        # without fp16's scaler a non-finite loss has already written NaN into the weights; with it, that step
        # was skipped, and only a run that overflows most of the time is lost (checked once an epoch: the
        # losses are on the host already, no extra sync)
        tolerated = steps // 2 if self.scaler.is_enabled() else 0
        if nonfinite > tolerated:
            raise TrainingDiverged(f"training loss not finite in epoch {self.epoch + 1} ({nonfinite} of {steps} "
                                   f"steps): the run diverged (train.lr={self.cfg.train.lr:g}; try a lower rate or "
                                   "train.grad_clip)")
        if nonfinite:
            self.log(f"warning: {nonfinite} training steps of epoch {self.epoch + 1} had a non-finite loss")
        events = self.pruner.end_epoch(self.epoch)
        if events:
            self._after_surgery()
        self.pruner.deterministic()
        recalibrate_bn(self.model, self.data.calib(self.cfg.prune.bn_batches), self.device)
        result = evaluate(self.model, self.data.test, self.device, self.ctx, self.amp_dtype)
        stats = self.pruner.stats()
        record = {"epoch": self.epoch + 1, "train_loss": seen[0] / max(seen[4], 1),
                  "train_acc": seen[1] / max(seen[2], 1), **result, **stats, "epoch_seconds": m["seconds"],
                  "blocks_removed": m["blocks_removed"] + sum(e.kind == "block" for e in events),
                  "hardened": self.pruner.state.hardened}
        self.history.append(record)
        self._snapshot()
        self.epoch, self.step_in_epoch, self.meter = self.epoch + 1, 0, _fresh_meter()
        if self.cfg.train.checkpoint:
            self.save_checkpoint()
        return record

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "format": 1, "config": to_dict(self.cfg), "world_size": self.ctx.world_size,
            "arch": architecture(self.model, self.cfg.model.name, self.kwargs),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "pruner": self.pruner.state_dict(),
            "position": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                         "loaders": loader_positions(self.data)},
            "meter": dict(self.meter), "history": self.history, "trajectory": self.trajectory,
            "rng": rng_states(), "tracking_run_id": self.tracking_run_id,
        }

    def save_checkpoint(self) -> None:
        # every rank's running sums of the epoch so far (they differ: each rank sees its own shard)
        meters = self.ctx.gather(dict(self.meter))
        if self.ctx.is_main:
            save_checkpoint({**self.checkpoint_payload(), "meters": meters}, self.out_dir / CHECKPOINT_DIR)
        self.ctx.barrier()  # nobody runs ahead (or exits) before the checkpoint is complete

    def restore(self, payload: dict[str, Any]) -> None:
        """Rebuild the shrunken network from the dense one and load every piece of state."""
        if payload.get("format") != 1:
            raise CheckpointError(f"checkpoint format {payload.get('format')!r} is not supported (expected 1)")
        if payload["world_size"] != self.ctx.world_size:
            raise CheckpointError(f"the checkpoint was written by a {payload['world_size']}-process run; resume it "
                                  f"with the same number of processes, not {self.ctx.world_size} (the data shards, "
                                  "steps per epoch and learning-rate schedule depend on it)")
        if payload["arch"]["kwargs"] != self.kwargs:
            raise CheckpointError(f"the checkpoint's model arguments {payload['arch']['kwargs']} differ from this "
                                  f"data's {self.kwargs}")
        try:
            self.pruner.shrink_to(payload["arch"])
            self.model.load_state_dict(payload["model"])
        except (ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"the checkpoint's weights do not fit its architecture: {exc}") from exc
        self._memory_format()
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.pruner.load_state_dict(payload["pruner"])
        position = payload["position"]
        self.epoch, self.step_in_epoch = position["epoch"], position["step_in_epoch"]
        restore_loader_positions(self.data, position["loaders"])
        meters = payload.get("meters") or [payload["meter"]] * self.ctx.world_size  # older checkpoints: rank 0's
        meter = meters[self.ctx.rank]
        # checkpoints written before the non-finite-step count: every step's loss counted
        self.meter = {**_fresh_meter(), "loss_seen": meter["seen"], **meter}
        self.history, self.trajectory = payload["history"], payload["trajectory"]
        self.tracking_run_id = payload["tracking_run_id"]
        set_rng_states(payload["rng"])
        self.ddp = self._wrap()


def epoch_line(record: dict, epochs: int, hardened: bool) -> str:
    return (f"epoch {record['epoch']}/{epochs} loss {record['train_loss']:.3f} test_acc {record['test_acc']:.4f} "
            f"MACs {record['mac_ratio']:.3f} params {record['param_ratio']:.3f} "
            f"blocks {record['layers_kept']}/{record['layers_total']} units {record['units_kept']}/"
            f"{record['units_total']} undecided {record['theta_undecided']} locked {record['theta_locked']}"
            f"{' hardened' if hardened else ''} "
            f"({record['epoch_seconds']:.1f}s)")


EPOCH_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "mac_ratio", "param_ratio", "layers_kept",
                 "units_kept", "theta_undecided", "theta_locked", "epoch_seconds")


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


EpochHook = Callable[[dict], Any]
"""called on rank 0 with each finished epoch's history record (a sweep reports it to Ray Tune)"""


def _train(cfg: Config, out_dir: Path | None, log: Log, resume_dir: Path | None = None,
           on_epoch: EpochHook | None = None) -> dict:
    ctx = init_distributed(pick_device(cfg.train.device).type)
    device = pick_device(cfg.train.device, ctx.local_rank)
    if not ctx.is_main:
        def log(message: str) -> None:  # only rank 0 talks
            return None
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    tracker = None
    try:
        payload = None
        if resume_dir is not None:
            payload, path = load_latest(resume_dir / CHECKPOINT_DIR, log)
            log(f"resuming {resume_dir} from {path}: epoch {payload['position']['epoch'] + 1}, "
                f"step {payload['position']['step_in_epoch']}")
            out_dir = resume_dir
            if to_dict(build_config(with_legacy_values(payload["config"]))) != to_dict(cfg):
                raise CheckpointError(f"{resume_dir}/config.yaml differs from the configuration stored in {path}; "
                                      "a run resumes with the configuration it was started with")
        run_dir = Path(ctx.broadcast_object(str(out_dir if out_dir is not None else default_run_dir(cfg))))
        training = Training(cfg, run_dir, ctx, device, log)  # builds the data first: bad data fails here
        if payload is not None:
            training.restore(payload)
        if ctx.is_main and payload is None:  # a resumed run keeps the config.yaml it was started with
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        tracker = _open_tracker(cfg, run_dir, ctx, training.tracking_run_id, log)
        if tracker.run_id is not None and tracker.run_id != training.tracking_run_id:  # a new MLflow run
            from cap.tracking import flatten

            tracker.log_params({**flatten(to_dict(cfg)), "world_size": ctx.world_size,
                                "global_batch_size": cfg.data.batch_size * ctx.world_size})
        training.tracking_run_id = tracker.run_id
        t, data = cfg.train, training.data
        log(f"run {run_dir}: {cfg.model.name} on {data.name} ({data.train_size} train / {data.test_size} test), "
            f"tau={cfg.prune.tau:g} alpha={cfg.prune.alpha:g} beta={cfg.prune.beta:g}, {t.epochs} epochs "
            f"of {training.steps} steps, device {device}"
            + (f", {ctx.world_size} processes ({ctx.backend})" if ctx.enabled else ""))
        with StopRequest() as stop:
            while training.epoch < t.epochs:
                training.train_epoch(stop)
                record = training.finish_epoch()
                hardened = training.pruner.enabled and training.pruner.state.hardened
                log(epoch_line(record, t.epochs, hardened))
                tracker.log_metrics({k: float(record[k]) for k in EPOCH_METRICS}, step=record["epoch"])
                if on_epoch is not None and ctx.is_main:
                    on_epoch(record)
                if ctx.any(stop.requested, device) and training.epoch < t.epochs:
                    if not cfg.train.checkpoint:  # finish_epoch wrote none: the signal still gets its checkpoint
                        training.save_checkpoint()
                    raise Preempted(run_dir, stop.signal_name or "a signal on another rank", training.epoch - 1,
                                    training.steps)
        # the ranks must end with the same network; the digests go into the summary as evidence
        weights = list(training.model.state_dict().values())
        training.rank_digests = ctx.agree("the final weights", digest_tensors(weights))
        summary = write_outputs(training, peak_memory_mb(device), tracker) if ctx.is_main else {}
        tracker.finish()
        ctx.barrier()
        return summary
    except Preempted:
        raise  # the MLflow run stays open: the resumed job continues it
    except KeyboardInterrupt:
        if tracker is not None:
            tracker.finish("KILLED")
        raise
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    finally:
        ctx.close()


def run(cfg: Config, out_dir: Path | str | None = None, log: Log = print, on_epoch: EpochHook | None = None) -> dict:
    """Train one model as configured; write config.yaml, summary.json, history.json, model.pt, plots, checkpoints."""
    return _train(cfg, Path(out_dir) if out_dir is not None else None, log, on_epoch=on_epoch)


def resume(run_dir: Path | str, log: Log = print, on_epoch: EpochHook | None = None) -> dict:
    """Continue the run in `run_dir` from its newest good checkpoint, with the configuration it was started with."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        raise CheckpointError(f"{run_dir} has no {CHECKPOINT_DIR}/ folder: nothing to resume (was it started with "
                              "train.checkpoint=false, or is it not a run folder?)")
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: cannot resume without the run's configuration")
    cfg = build_config(with_legacy_values(yaml.safe_load(config_file.read_text())))
    return _train(cfg, run_dir, log, resume_dir=run_dir, on_epoch=on_epoch)
