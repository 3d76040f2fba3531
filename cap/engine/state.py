"""The state of one run, and the one versioned schema its checkpoints are written in.

A run is its `Parts` (data, model, optimiser, schedule, gradient scaler, pruner: built from the
configuration, the same way again on resume) and its `Progress` (position, the running sums of the
epoch, the records). A checkpoint payload of the current FORMAT holds:

    format           FORMAT
    config           the run's whole configuration (cap.engine.config.to_dict)
    world_size       processes of the run that wrote it
    arch             the network's architecture after surgery (cap.core.arch.architecture)
    model, optimizer, scheduler, scaler, pruner      their state_dicts
    position         {"epoch", "step_in_epoch", "loaders": cap.data.bundle.loader_positions}
    meters           every rank's meter (cap.engine.loop.new_meter), in rank order
    history, trajectory, tracking_run_id
    rng              torch, CUDA, numpy and Python generator states

`migrate` brings an older payload to this schema (the only place that knows older ones); `restore`
reads the current schema only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cap.core.arch import architecture
from cap.core.budget import BudgetError
from cap.core.pruner import Pruner
from cap.data import DataBundle, DataError, build_data
from cap.data.bundle import derive_seed, loader_positions, restore_loader_positions
from cap.engine.checkpoint import CheckpointError, load_latest, save_checkpoint
from cap.engine.config import Config, ConfigError, build_config, to_dict, with_legacy_values
from cap.engine.distributed import DistContext, wrap_model
from cap.engine.loop import AMP_DTYPES, make_scheduler, new_meter
from cap.models import ArchitectureError, build_from_architecture, create_model, load_architecture

FORMAT = 4
"""the checkpoint schema this code writes; `migrate` reads every older one"""


# ---------------------------------------------------------------------------- what a run is made of
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


@dataclass
class Parts:
    """The modules of one run. `ddp` is what a training step calls: the model, or its DDP wrapper."""

    cfg: Config
    ctx: DistContext
    device: torch.device
    data: DataBundle
    kwargs: dict
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    pruner: Pruner
    scaler: torch.amp.GradScaler
    steps: int
    """training steps per epoch"""
    ddp: nn.Module

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.cfg.train.amp]

    def memory_format(self) -> None:
        if self.cfg.train.channels_last:  # in place: parameters keep their identity for the optimiser
            self.model.to(memory_format=torch.channels_last)

    def after_surgery(self) -> nn.Module:
        """Memory format and DDP wrapper again, over the parameters surgery replaced; returns the new `ddp`."""
        self.memory_format()
        self.ddp = wrap_model(self.model, self.ctx, self.device)
        return self.ddp


def steps_per_epoch(cfg: Config, data: DataBundle, world_size: int) -> int:
    full = len(data.train)
    if full == 0:  # e.g. a shard smaller than one batch (last batches are dropped in training)
        raise DataError(f"{data.name}: {data.train_size} training images make no full batch of "
                        f"data.batch_size={cfg.data.batch_size} per process ({world_size} processes); "
                        "use a smaller batch, fewer processes or more data")
    limit = cfg.train.max_steps_per_epoch
    return full if limit is None else min(full, limit)


def build_parts(cfg: Config, ctx: DistContext, device: torch.device) -> Parts:
    """Data first (bad data fails before any work), then the seeded model, SGD, schedule, pruner, scaler."""
    t = cfg.train
    data = build_data(cfg.data, cfg.seed, ctx.rank, ctx.world_size, device.index if device.type == "cuda" else None)
    seed_everything(cfg.seed)
    kwargs = model_kwargs(cfg, data)
    model = (model_from_arch_file(cfg.model.arch, cfg.model.name, kwargs) if cfg.model.arch
             else create_model(cfg.model.name, **kwargs)).to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                                weight_decay=t.weight_decay)
    steps = steps_per_epoch(cfg, data, ctx.world_size)
    try:
        pruner = Pruner(model, cfg.prune, steps, t.epochs, optimizer, sync=ctx, seed=derive_seed(cfg.seed, "gates"))
    except BudgetError as exc:  # a target these gates cannot reach: a configuration error, before any training
        raise ConfigError(str(exc)) from exc
    scheduler = make_scheduler(optimizer, cfg, steps * t.epochs, hardened_at=lambda: pruner.state.harden_step)
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
    return Parts(cfg, ctx, device, data, kwargs, model, optimizer, scheduler, pruner, scaler, steps,
                 wrap_model(model, ctx, device))


# ---------------------------------------------------------------------------- where a run stands
@dataclass
class Progress:
    """Position, running sums of the current epoch (this rank's), and the records of the epochs done."""

    epoch: int = 0
    step_in_epoch: int = 0
    meter: dict[str, float] = field(default_factory=new_meter)
    history: list[dict] = field(default_factory=list)
    trajectory: list[dict] = field(default_factory=list)
    """theta snapshots (cap.engine.plots.plot_theta_trajectory)"""
    tracking_run_id: str | None = None


def snapshot(parts: Parts, progress: Progress) -> None:
    """Add the thetas of now to the trajectory."""
    step = parts.pruner.state.step
    progress.trajectory.append({"step": step, "epoch": step / parts.steps, "blocks": parts.pruner.theta_summary()})


def fresh_progress(parts: Parts) -> Progress:
    progress = Progress()
    snapshot(parts, progress)
    return progress


# ---------------------------------------------------------------------------- the checkpoint schema
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


def payload(parts: Parts, progress: Progress, meters: list[dict[str, float]]) -> dict[str, Any]:
    """The checkpoint of now, in FORMAT; `meters`: every rank's meter."""
    cfg = parts.cfg
    return {
        "format": FORMAT, "config": to_dict(cfg), "world_size": parts.ctx.world_size,
        "arch": architecture(parts.model, cfg.model.name, parts.kwargs),
        "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
        "pruner": parts.pruner.state_dict(),
        "position": {"epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch,
                     "loaders": loader_positions(parts.data)},
        "meters": meters, "history": progress.history, "trajectory": progress.trajectory,
        "rng": rng_states(), "tracking_run_id": progress.tracking_run_id,
    }


def save(parts: Parts, progress: Progress, directory: Path) -> None:
    """Write the checkpoint (rank 0) with every rank's running sums of the epoch so far (each rank sees its
    own shard, so they differ); all ranks wait until it is complete."""
    meters = parts.ctx.gather(dict(progress.meter))
    if parts.ctx.is_main:
        save_checkpoint(payload(parts, progress, meters), directory)
    parts.ctx.barrier()  # nobody runs ahead (or exits) before the checkpoint is complete


def _format_1_to_2(old: dict[str, Any]) -> dict[str, Any]:
    """Format 1 grew keys over time without a version bump; fill in what its earlier writers left out."""
    new = {k: v for k, v in old.items() if k != "meter"}
    # before "meters": rank 0's running sums only, which every rank then took
    meters = old.get("meters") or [old["meter"]] * old["world_size"]
    # before the non-finite-step count: every step's loss counted
    new["meters"] = [{**new_meter(), "loss_seen": m["seen"], **m} for m in meters]
    # before a config key existed whose default changes what a run does: the old behaviour
    new["config"] = with_legacy_values(old["config"])
    pruner = dict(old["pruner"])
    if "monitor" in pruner:  # pruning on (tau > 0); before the keep rule and step_norm: empty tables
        pruner["monitor"] = {"keep_streak": {}, **pruner["monitor"]}
        pruner.setdefault("locked", {})
        pruner.setdefault("theta_mean_sq", {})
    pruner["state"] = {"locked_at_harden": None, **pruner["state"]}
    new["pruner"] = pruner
    new["format"] = 2
    return new


def _format_2_to_3(old: dict[str, Any]) -> dict[str, Any]:
    """Budget targets and learning-rate rewinding: their keys, at the values that leave a run as it was."""
    config = {key: dict(value) if isinstance(value, dict) else value for key, value in old["config"].items()}
    config["prune"] = {"target_macs": None, "target_params": None, **config.get("prune", {})}
    config["train"] = {"lr_rewind": None, **config.get("train", {})}
    pruner = dict(old["pruner"])
    pruner["state"] = {"multiplier": 1.0, "budget_switched": None, **pruner["state"]}
    return {**old, "config": config, "pruner": pruner, "format": 3}


def _format_3_to_4(old: dict[str, Any]) -> dict[str, Any]:
    """prune.sample_fraction: every example drew its gates before it existed."""
    config = {key: dict(value) if isinstance(value, dict) else value for key, value in old["config"].items()}
    config["prune"] = {"sample_fraction": 1.0, **config.get("prune", {})}
    return {**old, "config": config, "format": 4}


_UPGRADES = {1: _format_1_to_2, 2: _format_2_to_3, 3: _format_3_to_4}
"""format n -> the function that turns a payload of format n into one of format n + 1"""


def migrate(old: dict[str, Any]) -> dict[str, Any]:
    """`old` (a checkpoint payload of any format this code has written) in the current FORMAT; a payload
    already in it is returned as it is. The argument is not modified."""
    version = old.get("format")
    if version != FORMAT and version not in _UPGRADES:
        raise CheckpointError(f"checkpoint format {version!r} is not supported (this code reads formats "
                              f"{min(_UPGRADES)} to {FORMAT})")
    while old["format"] != FORMAT:
        old = _UPGRADES[old["format"]](old)
    return old


def config_difference(saved: dict[str, Any], cfg: Config) -> str | None:
    """Why the configuration stored in a checkpoint is not `cfg`'s (the first keys that differ), or None."""
    try:
        stored = to_dict(build_config(saved))
    except ConfigError as exc:
        return f"its configuration is not valid here ({exc})"
    mine = to_dict(cfg)
    differ = [f"{section}.{key} is {stored[section].get(key)!r} in it, {value!r} in config.yaml"
              for section, values in mine.items() if isinstance(values, dict)
              for key, value in values.items() if stored[section].get(key) != value]
    differ += [f"{key} is {stored[key]!r} in it, {value!r} in config.yaml" for key, value in mine.items()
               if not isinstance(value, dict) and stored[key] != value]
    return "; ".join(differ[:3]) + (f" (and {len(differ) - 3} more)" if len(differ) > 3 else "") if differ else None


def load(directory: Path, log=print, cfg: Config | None = None) -> tuple[dict[str, Any], Path]:
    """The newest good checkpoint in `directory` (see cap.engine.checkpoint.load_latest), in FORMAT. With `cfg`,
    one written with another configuration (another run's file) is passed over like a corrupt one."""
    def belongs(raw: dict[str, Any], path: Path) -> str | None:
        differs = config_difference(migrate(raw)["config"], cfg) if cfg is not None else None
        return f"checkpoint {path} belongs to another run: {differs}" if differs else None

    raw, path = load_latest(directory, log, belongs)
    return migrate(raw), path


def _check_fits(saved: dict[str, Any], parts: Parts) -> None:
    world_size = parts.ctx.world_size
    if saved["world_size"] != world_size:
        raise CheckpointError(f"the checkpoint was written by a {saved['world_size']}-process run; resume it "
                              f"with the same number of processes, not {world_size} (the data shards, "
                              "steps per epoch and learning-rate schedule depend on it)")
    if saved["arch"]["kwargs"] != parts.kwargs:
        raise CheckpointError(f"the checkpoint's model arguments {saved['arch']['kwargs']} differ from this "
                              f"data's {parts.kwargs}")


def restore(parts: Parts, saved: dict[str, Any]) -> Progress:
    """Rebuild the shrunken network from the dense one of `parts`, load every piece of state of `saved` (a
    payload in FORMAT, see `load`) into it, and return the run's progress."""
    _check_fits(saved, parts)
    try:
        parts.pruner.shrink_to(saved["arch"])
        parts.model.load_state_dict(saved["model"])
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"the checkpoint's weights do not fit its architecture: {exc}") from exc
    parts.memory_format()
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    parts.scaler.load_state_dict(saved["scaler"])
    parts.pruner.load_state_dict(saved["pruner"])
    position = saved["position"]
    restore_loader_positions(parts.data, position["loaders"])
    progress = Progress(epoch=position["epoch"], step_in_epoch=position["step_in_epoch"],
                        meter=dict(saved["meters"][parts.ctx.rank]), history=saved["history"],
                        trajectory=saved["trajectory"], tracking_run_id=saved["tracking_run_id"])
    set_rng_states(saved["rng"])
    parts.ddp = wrap_model(parts.model, parts.ctx, parts.device)
    return progress
