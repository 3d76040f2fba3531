"""Experiment configuration: typed sections, YAML loading, dotted overrides, validation.

Every key has a default here; a YAML file and `key=value` overrides change them. Validation runs
before any work starts and names the offending key together with what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cap.core.config import PruneConfig
from cap.data.config import DataConfig
from cap.tracking.config import TrackingConfig

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and what is allowed."""


@dataclass
class ModelConfig:
    name: str = "resnet20"
    """registry name: resnet20/32/56/110 (CIFAR-style) or resnet18/34/50 (ImageNet-style)"""
    width: int = 16
    """channels of the first stage of the CIFAR-style ResNets (ignored by ImageNet-style ones)"""
    arch: str | None = None
    """train this structure from scratch: a run's model.pt or an export's arch.json (the lower limit of
    what a pruned architecture costs to train); None trains the dense network"""


@dataclass
class TrainConfig:
    epochs: int = 8
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    """step schedule: fractions of training at which the rate is multiplied by step_gamma"""
    step_gamma: float = 0.1
    lr_warmup_epochs: float = 0.0
    """the learning rate rises linearly from lr / steps to lr over this many epochs, then follows the schedule
    (deep ResNets such as ResNet-56 at lr 0.1 start with a loss above chance without it)"""
    lr_rewind: float | None = 0.0
    """after hardening, replay the learning-rate schedule from this fraction of training over the remaining
    steps (learning-rate rewinding; 0 = a fresh schedule for the fixed network); null continues the schedule"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    """torch CPU threads (None: torch's default)"""
    max_steps_per_epoch: int | None = None
    """cap on training steps per epoch (quick runs); None trains on the whole set"""
    progress: bool = True
    """a tqdm progress bar per epoch"""
    amp: Literal["off", "bf16", "fp16"] = "off"
    """mixed precision: autocast to bf16 or fp16 (fp16 with a gradient scaler); off by default"""
    channels_last: bool = False
    """NHWC memory format for model and inputs (faster convolutions with AMP on tensor-core GPUs)"""
    grad_clip: float | None = None
    """clip the global gradient norm of the weights to this value (None: no clipping)"""
    deterministic: bool = False
    """deterministic kernels only (torch.use_deterministic_algorithms): on a GPU, a resumed run then equals an
    uninterrupted one bit for bit, at some speed cost; CPU training is deterministic without it"""
    checkpoint: bool = True
    """write checkpoints/last.pt every epoch and on SIGTERM/SIGUSR1 (rank 0)"""


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a finite number", bool: "true/false", str: "a string",
            type(None): "null"}.get(tp, str(tp))


_UNFIT = object()
"""what a coercer below returns for a value that does not fit its type"""


def _literal(key: str, value: Any, tp: Any) -> Any:
    options = typing.get_args(tp)
    if value in options and not isinstance(value, bool):
        return value
    # YAML reads a bare off/on as false/true; accept them where "off"/"on" is an option
    if isinstance(value, bool) and (word := "on" if value else "off") in options:
        return word
    return _UNFIT


def _union(key: str, value: Any, tp: Any) -> Any:
    for arg in typing.get_args(tp):
        try:
            return _coerce(key, value, arg)
        except ConfigError:
            continue
    return _UNFIT


def _list(key: str, value: Any, tp: Any) -> Any:
    if not isinstance(value, list):
        return _UNFIT
    return [_coerce(f"{key}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value)]


def _float(key: str, value: Any, tp: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):  # YAML 1.1 reads 1e-3 as a string
        number = float(value)
    else:
        return _UNFIT
    # .nan and .inf are floats to YAML, but no key means them: inf crashes later (torch.bernoulli, timeouts)
    return number if math.isfinite(number) else _UNFIT


def _exactly(kind: type) -> Any:
    """A coercer that takes values of `kind` as they are (no bool for int: bool is an int in Python)."""
    def coerce(key: str, value: Any, tp: Any) -> Any:
        fits = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        return value if fits else _UNFIT
    return coerce


_COERCERS: dict[Any, Any] = {"literal": _literal, "union": _union, "list": _list, float: _float,
                             type(None): _exactly(type(None)), bool: _exactly(bool), int: _exactly(int),
                             str: _exactly(str)}


def _kind(tp: Any) -> Any:
    """The key of `tp` in _COERCERS."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "literal"
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        return "union"
    return "list" if origin is list else tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints become floats where floats are asked)."""
    coercer = _COERCERS.get(_kind(tp))
    out = _UNFIT if coercer is None else coercer(key, value, tp)
    if out is _UNFIT:
        raise ConfigError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}")
    return out


def _merge(obj: Any, data: dict, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; allowed keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def _check_ranges(cfg: Config) -> None:
    p, t, d = cfg.prune, cfg.train, cfg.data

    def need(ok: bool, key: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': got {value!r}, allowed {allowed}")

    need(p.tau >= 0, "prune.tau", "tau >= 0 (0 = no pruning pressure)", p.tau)
    need(0 <= p.alpha <= 1, "prune.alpha", "0 <= alpha <= 1", p.alpha)
    need(0 <= p.beta <= 1, "prune.beta", "0 <= beta <= 1", p.beta)
    need(0 <= p.explore < 0.5, "prune.explore", "0 <= explore < 0.5", p.explore)
    need(0 < p.sample_fraction <= 1, "prune.sample_fraction", "0 < sample_fraction <= 1", p.sample_fraction)
    need(p.sample_fraction == 1 or p.sampling == "example", "prune.sample_fraction",
         "1 with prune.sampling=batch (a share of the batch needs per-example gates)", p.sample_fraction)
    need(p.eta > 0, "prune.eta", "eta > 0", p.eta)
    need(p.warmup_epochs >= 0, "prune.warmup_epochs", ">= 0", p.warmup_epochs)
    need(p.check_every >= 1, "prune.check_every", ">= 1", p.check_every)
    need(0 <= p.theta_min < 0.5, "prune.theta_min", "0 <= theta_min < 0.5", p.theta_min)
    need(0 <= p.margin < 1, "prune.margin", "0 <= margin < 1", p.margin)
    need(p.patience >= 1, "prune.patience", ">= 1", p.patience)
    need(p.harden_at is None or 0 < p.harden_at <= 1, "prune.harden_at", "null or a fraction in (0, 1]",
         p.harden_at)
    need(p.harden_patience is None or p.harden_patience >= 1, "prune.harden_patience", "null or >= 1",
         p.harden_patience)
    need(p.bn_batches >= 0, "prune.bn_batches", ">= 0", p.bn_batches)
    for key in ("target_macs", "target_params"):
        target = getattr(p, key)
        need(target is None or 0 < target <= 1, f"prune.{key}", "null or a fraction of the dense network in (0, 1]",
             target)
        need(target is None or p.tau > 0, "prune.tau", f"> 0 with prune.{key} (tau is the multiplier's starting "
             "value; 0 means no pruning)", p.tau)
        need(target is None or p.harden_at is not None, "prune.harden_at", f"a fraction in (0, 1] with prune.{key} "
             "(the target is met when the network is hardened)", p.harden_at)
    need(p.units or p.layers or p.tau == 0, "prune.units", "true where prune.layers is false and tau > 0",
         p.units)
    need(t.epochs >= 1, "train.epochs", ">= 1", t.epochs)
    need(t.lr > 0, "train.lr", "> 0", t.lr)
    need(0 <= t.lr_warmup_epochs < t.epochs, "train.lr_warmup_epochs", ">= 0 and < train.epochs", t.lr_warmup_epochs)
    need(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    need(t.lr_rewind is None or 0 <= t.lr_rewind < 1, "train.lr_rewind", "null or a fraction in [0, 1)", t.lr_rewind)
    need(all(0 < m < 1 for m in t.milestones), "train.milestones", "fractions in (0, 1)", t.milestones)
    need(t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1, "train.max_steps_per_epoch",
         "null or >= 1", t.max_steps_per_epoch)
    need(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "null or > 0", t.grad_clip)
    need(cfg.tracking.timeout > 0, "tracking.timeout", "> 0", cfg.tracking.timeout)
    need(bool(cfg.tracking.experiment), "tracking.experiment", "a non-empty name", cfg.tracking.experiment)
    need(d.batch_size >= 1, "data.batch_size", ">= 1", d.batch_size)
    need(d.eval_batch_size >= 1, "data.eval_batch_size", ">= 1", d.eval_batch_size)
    need(d.train_subset is None or d.train_subset >= 1, "data.train_subset", "null or >= 1", d.train_subset)
    need(d.test_subset is None or d.test_subset >= 1, "data.test_subset", "null or >= 1", d.test_subset)
    need(d.workers >= 0, "data.workers", ">= 0", d.workers)
    need(d.name != "idx" or d.root is not None, "data.root", "a folder in MNIST's file layout for data.name=idx",
         d.root)
    need(cfg.model.width >= 1, "model.width", ">= 1", cfg.model.width)
    need(0 <= cfg.seed < 2**32, "seed", "an integer in [0, 2**32) (numpy's seed range)", cfg.seed)
    need(t.threads is None or t.threads >= 1, "train.threads", "null or >= 1", t.threads)
    from cap.models import list_models  # lazy: the registry imports torch

    need(cfg.model.name in list_models(), "model.name", "one of " + ", ".join(list_models()), cfg.model.name)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ('a.b', yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. prune.tau=0.5)")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def nest(dotted: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return out


def build_config(data: dict | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then `data` (a parsed YAML mapping), then `key=value` overrides; validated."""
    cfg = Config()
    _merge(cfg, data or {}, "")
    if overrides:
        _merge(cfg, nest(dict(parse_override(o) for o in overrides)), "")
    _check_ranges(cfg)
    return cfg


def _read_yaml(path: Path, what: str) -> dict:
    if path.is_dir():
        raise ConfigError(f"{what} '{path}' is a folder; give the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {exc}") from exc


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `key=value` overrides; validated."""
    return build_config(_read_yaml(Path(path), "config file") if path is not None else {}, overrides)


LEGACY_VALUES: dict[str, dict[str, Any]] = {"prune": {"lock_kept": False}, "train": {"lr_rewind": None}}
"""Keys added after runs could be checkpointed whose default changes what such a run does. A configuration
saved without one (an older run folder or checkpoint) gets this value back, the behaviour it was started with.
New keys whose default reproduces the old behaviour (e.g. train.lr_warmup_epochs = 0) need no entry."""


def with_legacy_values(data: dict) -> dict:
    """A copy of a saved configuration mapping with the LEGACY_VALUES it lacks filled in."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, values in LEGACY_VALUES.items():
        node = out.setdefault(section, {})
        for key, value in values.items():
            node.setdefault(key, value)
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def load_saved_config(path: str | Path) -> Config:
    """A run folder's config.yaml (or any saved configuration file), with the LEGACY_VALUES it lacks, validated."""
    return build_config(with_legacy_values(_read_yaml(Path(path), "saved configuration")))


__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "PruneConfig", "TrackingConfig", "TrainConfig",
           "build_config", "load_config", "load_saved_config", "nest", "parse_override", "to_dict",
           "with_legacy_values"]
