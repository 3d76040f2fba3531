"""Sweep specifications (sweeps/*.yaml): the base experiment, the search space, and how trials run.

Loading validates everything before Ray starts: unknown or missing keys, bad ranges, and every value
the space can produce for a config key (grid/choice values and range bounds are built into a config
and checked by cap.engine.config), so a sweep never fails hours later on a typo.

    name: fmnist-resnet20            # Ray experiment name and MLflow parent run name
    base:
      config: ../configs/fmnist_resnet20.yaml   # relative to the sweep file
      overrides: [train.epochs=4]
    space:                           # dotted config keys; usually the three trade-offs
      prune.tau: {loguniform: [0.1, 2.0]}
      prune.alpha: {grid: [0.0, 0.5, 1.0]}
      prune.beta: {uniform: [0.2, 0.8]}
    search: random                   # grid | random | optuna
    num_samples: 2                   # random: per grid point; optuna: trials in all; grid: repeats
    resources: {cpus: 1, gpus: 0}    # per trial
    max_concurrent: 2
    max_failures: 1                  # a failed trial is retried this many times, then reported
    scheduler: null                  # or {type: asha, metric: test_acc, grace_period: 2, reduction_factor: 2}
    storage: sweeps_out              # Ray's experiment folder and the trials' run folders (relative to cwd)
    tracking: {uri: null, experiment: cap-sweeps}
    seed: 0                          # of the search (the trials' training seed is the base config's)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cap.engine.config import Config, ConfigError, build_config, load_config, nest, parse_override, to_dict
from cap.tracking import flatten

RANGE_KINDS = ("uniform", "loguniform")
LIST_KINDS = ("grid", "choice")
SEARCHES = ("grid", "random", "optuna")
SCHEDULER_TYPES = ("asha",)
TOP_KEYS = {"name", "base", "space", "search", "num_samples", "resources", "max_concurrent", "max_failures",
            "scheduler", "storage", "tracking", "seed"}

OBJECTIVES = ("test_acc", "mac_reduction", "param_reduction")
"""what every trial reports at its end and what optuna maximises (jointly)"""


class SweepSpecError(ConfigError):
    """The sweep file is wrong; the message names the file, the key and what is allowed."""


@dataclass
class Dimension:
    key: str
    kind: str
    values: list[Any]
    """grid/choice: the values; uniform/loguniform: [low, high]"""

    def ray(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(self.values)
        if self.kind == "choice":
            return tune.choice(self.values)
        low, high = self.values
        return tune.loguniform(low, high) if self.kind == "loguniform" else tune.uniform(low, high)


@dataclass
class Scheduler:
    type: str = "asha"
    metric: str = "test_acc"
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass
class SweepSpec:
    name: str
    path: Path
    base_config: Path | None
    base_overrides: list[str]
    space: list[Dimension]
    base: dict
    """the base experiment: base_config with base_overrides, validated, as a config mapping (loaded once)"""
    search: str = "random"
    num_samples: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    max_failures: int = 1
    scheduler: Scheduler | None = None
    storage: Path = field(default_factory=lambda: Path("sweeps_out"))
    tracking_uri: str | None = None
    experiment: str = "cap-sweeps"
    seed: int = 0

    @property
    def experiment_dir(self) -> Path:
        """Ray's experiment folder; the trials' cap run folders live in its runs/ subfolder."""
        return self.storage / self.name


def with_values(data: dict, values: dict[str, Any]) -> Config:
    """A config from a config mapping with dotted keys set to values (no YAML round trip: floats stay exact)."""
    return build_config(nest({**flatten(copy.deepcopy(data)), **values}))


def _fail(spec_path: Path, key: str, message: str) -> SweepSpecError:
    return SweepSpecError(f"sweep '{spec_path}': key '{key}': {message}")


def _number(spec_path: Path, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(spec_path, key, f"got {value!r}, expected a finite number")
    return float(value)


def _dimension(spec_path: Path, key: str, raw: Any) -> Dimension:
    where = f"space.{key}"
    if not isinstance(raw, dict) or len(raw) != 1:
        raise _fail(spec_path, where, f"got {raw!r}, expected one of "
                                      f"{{grid: [...]}}, {{choice: [...]}}, {{uniform: [low, high]}}, "
                                      f"{{loguniform: [low, high]}}")
    kind, values = next(iter(raw.items()))
    if kind in LIST_KINDS:
        if not isinstance(values, list) or not values:
            raise _fail(spec_path, where, f"{kind} needs a non-empty list of values, got {values!r}")
        return Dimension(key, kind, values)
    if kind in RANGE_KINDS:
        if not isinstance(values, list) or len(values) != 2:
            raise _fail(spec_path, where, f"{kind} needs [low, high], got {values!r}")
        low, high = (_number(spec_path, where, v) for v in values)
        if not low < high:
            raise _fail(spec_path, where, f"{kind} needs low < high, got [{low:g}, {high:g}]")
        if kind == "loguniform" and low <= 0:
            raise _fail(spec_path, where, f"loguniform needs low > 0, got {low:g}")
        return Dimension(key, kind, [low, high])
    raise _fail(spec_path, where, f"unknown kind '{kind}'; allowed: {', '.join(LIST_KINDS + RANGE_KINDS)}")


def _check_values(spec: SweepSpec) -> None:
    """Every value a dimension can take must make a valid config on its own (names the key if not)."""
    for dim in spec.space:
        for value in dim.values:
            try:
                with_values(spec.base, {dim.key: value})
            except ConfigError as exc:
                raise _fail(spec.path, f"space.{dim.key}", f"value {value!r} is not valid: {exc}") from exc


def _mapping(spec_path: Path, key: str, raw: Any, allowed: set[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(spec_path, key, f"expected a mapping, got {raw!r}")
    unknown = set(raw) - allowed
    if unknown:
        raise _fail(spec_path, f"{key}.{sorted(unknown)[0]}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
    return raw


def _read(path: Path) -> dict:
    """The sweep file's top-level mapping, its keys checked."""
    if path.is_dir():
        raise SweepSpecError(f"sweep file '{path}' is a folder; give the path of a sweep YAML file")
    if not path.is_file():
        raise SweepSpecError(f"sweep file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepSpecError(f"sweep file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SweepSpecError(f"sweep file '{path}' must be a mapping of keys, got {type(raw).__name__}")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise _fail(path, sorted(unknown)[0], f"unknown key; allowed: {', '.join(sorted(TOP_KEYS))}")
    for required in ("name", "space"):
        if required not in raw:
            raise _fail(path, required, "missing (required)")
    return raw


def _name(path: Path, name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise _fail(path, "name", f"got {name!r}, expected a non-empty folder-safe name")
    return name


def _base(path: Path, raw: Any) -> tuple[Path | None, list[str]]:
    """base: (the config file, resolved from the sweep file's folder; the overrides, each parsed once to check it)."""
    base = _mapping(path, "base", raw, {"config", "overrides"})
    base_config = (path.parent / base["config"]).resolve() if base.get("config") else None
    overrides = base.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise _fail(path, "base.overrides", f"expected a list of key=value strings, got {overrides!r}")
    for text in overrides:
        parse_override(text)
    return base_config, list(overrides)


def _space(path: Path, raw: Any, search: Any) -> tuple[list[Dimension], str]:
    """space and search: the dimensions, and a search that can take them."""
    if not isinstance(raw, dict) or not raw:
        raise _fail(path, "space", "expected a non-empty mapping of config keys to dimensions")
    space = [_dimension(path, key, value) for key, value in raw.items()]
    if search not in SEARCHES:
        raise _fail(path, "search", f"got {search!r}, allowed: {', '.join(SEARCHES)}")
    if search == "grid" and (ranged := [d.key for d in space if d.kind != "grid"]):
        raise _fail(path, f"space.{ranged[0]}", "search: grid takes only {grid: [...]} dimensions")
    if search == "optuna" and (grids := [d.key for d in space if d.kind == "grid"]):
        raise _fail(path, f"space.{grids[0]}", "search: optuna samples its points; use choice instead of grid")
    return space, search


def _scheduler(path: Path, raw: Any, epochs: int) -> Scheduler | None:
    """The early-stopping scheduler, with what ASHA asserts checked here (its max_t is the base's train.epochs)."""
    if raw is None:
        return None
    scheduler = Scheduler(**_mapping(path, "scheduler", raw, {"type", "metric", "grace_period", "reduction_factor"}))
    if scheduler.type not in SCHEDULER_TYPES:
        raise _fail(path, "scheduler.type", f"got {scheduler.type!r}, allowed: {', '.join(SCHEDULER_TYPES)}")
    if scheduler.metric not in ("test_acc", "test_loss", "train_loss"):
        raise _fail(path, "scheduler.metric", f"got {scheduler.metric!r}, allowed: test_acc, test_loss, train_loss")
    grace = _count(path, "scheduler.grace_period", scheduler.grace_period, 1)
    if grace > epochs:
        raise _fail(path, "scheduler.grace_period", f"got {grace}, expected at most the base's train.epochs ({epochs})")
    if _number(path, "scheduler.reduction_factor", scheduler.reduction_factor) <= 1:
        raise _fail(path, "scheduler.reduction_factor", f"got {scheduler.reduction_factor!r}, expected a number > 1 "
                                                        "(the share of trials kept at each rung is 1/factor)")
    return scheduler


def _count(path: Path, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(path, key, f"got {value!r}, expected an integer >= {minimum}")
    return value


def _trials(path: Path, raw: dict, resources: dict) -> dict[str, Any]:
    """How many trials run, on what, how often retried: SweepSpec's fields, checked in the file's order."""
    max_concurrent = raw.get("max_concurrent")
    fields = {
        "num_samples": _count(path, "num_samples", raw.get("num_samples", 1), 1),
        "cpus_per_trial": _number(path, "resources.cpus", resources.get("cpus", 1)),
        "gpus_per_trial": _number(path, "resources.gpus", resources.get("gpus", 0)),
        "max_concurrent": None if max_concurrent is None else _count(path, "max_concurrent", max_concurrent, 1),
        "max_failures": _count(path, "max_failures", raw.get("max_failures", 1), 0),
        "storage": Path(raw.get("storage") or "sweeps_out").resolve(),
        "seed": _count(path, "seed", raw.get("seed", 0), 0),
    }
    if fields["cpus_per_trial"] <= 0 or fields["gpus_per_trial"] < 0:
        raise _fail(path, "resources", f"need cpus > 0 and gpus >= 0, got cpus={fields['cpus_per_trial']:g} "
                                       f"gpus={fields['gpus_per_trial']:g}")
    return fields


def _base_experiment(path: Path, base_config: Path | None, overrides: list[str]) -> dict:
    """The base experiment, loaded and validated (the one load of its YAML)."""
    if base_config is not None and not base_config.is_file():
        raise _fail(path, "base.config", f"'{base_config}' does not exist (relative paths are taken from the "
                                         "sweep file's folder)")
    return to_dict(load_config(base_config, overrides))


def load_sweep(path: str | Path, storage: str | Path | None = None) -> SweepSpec:
    """Read and fully validate a sweep file; `storage` replaces its storage folder (`cap sweep --storage`)."""
    path = Path(path)
    raw = _read(path)
    name = _name(path, raw["name"])
    base_config, overrides = _base(path, raw.get("base"))
    space, search = _space(path, raw["space"], raw.get("search", "random"))
    resources = _mapping(path, "resources", raw.get("resources"), {"cpus", "gpus"})
    tracking = _mapping(path, "tracking", raw.get("tracking"), {"uri", "experiment"})
    trials = _trials(path, raw, resources)
    base = _base_experiment(path, base_config, overrides)
    scheduler = _scheduler(path, raw.get("scheduler"), base["train"]["epochs"])
    spec = SweepSpec(name=name, path=path, base_config=base_config, base_overrides=overrides, space=space,
                     base=base, search=search, scheduler=scheduler,
                     tracking_uri=tracking.get("uri"), experiment=tracking.get("experiment", "cap-sweeps"), **trials)
    _check_values(spec)
    if storage is not None:
        spec.storage = Path(storage).resolve()
    return spec
