"""Gated models rebuilt from a stored architecture: the one way training and export read structures.

An architecture is the plain data of cap.core.arch (`{"name", "kwargs", "blocks"}`). It comes from
a run folder's model.pt (`{"arch": ..., "state_dict": ...}`) or from an export's arch.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cap.core.arch import deterministic_architecture, removal_plan_for
from cap.core.gates import set_gate_mode
from cap.core.surgery import apply_plan
from cap.models.registry import create_model

RUN_MODEL = "model.pt"
"""a run folder's trained gated model: {"arch": architecture, "state_dict": weights + thetas}"""


class ArchitectureError(ValueError):
    """A stored architecture or trained model cannot be read or built; the message names the file."""


def build_from_architecture(arch: dict) -> nn.Module:
    """The dense registry model with the removals that give the architecture `arch`."""
    model = create_model(arch["name"], **arch["kwargs"])
    apply_plan(model, removal_plan_for(model, arch))
    return model


def load_trained(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trained gated model of a run folder (weights_only: no module is unpickled), in deterministic mode,
    and its stored architecture."""
    path = Path(run_dir) / RUN_MODEL
    if not path.is_file():
        raise ArchitectureError(f"{path} does not exist: a finished run folder has it (cap train writes {RUN_MODEL} "
                                "at the end)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = build_from_architecture(saved["arch"])
        model.load_state_dict(saved["state_dict"])
    except Exception as exc:
        raise ArchitectureError(f"{path} cannot be loaded as a cap model: {exc}") from exc
    model.eval()
    set_gate_mode(model, "deterministic")
    return model, saved["arch"]


def load_architecture(path: str | Path) -> dict[str, Any]:
    """The architecture in `path`: an arch.json as it is, or a run's model.pt as its deterministic structure
    (units and blocks with theta < 0.5 go too)."""
    file = Path(path)
    try:
        if file.suffix == ".json":
            arch = json.loads(file.read_text())
        else:
            trained, saved = load_trained(file.parent)
            arch = deterministic_architecture(trained, saved["name"], saved["kwargs"])
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ArchitectureError(f"cannot read an architecture from {file}: {exc}") from exc
    if not isinstance(arch, dict) or not {"name", "kwargs", "blocks"} <= arch.keys():
        raise ArchitectureError(f"{file} is not an architecture (it needs 'name', 'kwargs' and 'blocks')")
    _check_blocks(file, arch["blocks"])
    return arch


def _check_blocks(file: Path, blocks: Any) -> None:
    """Each block entry is removed, or kept with integer widths >= 1 (a width of 7.5 would index a channel later)."""
    if not isinstance(blocks, list):
        raise ArchitectureError(f"{file}: 'blocks' must be a list of block entries, got {type(blocks).__name__}")
    for i, entry in enumerate(blocks):
        if not isinstance(entry, dict) or not isinstance(entry.get("removed"), bool):
            raise ArchitectureError(f"{file}: block entry {i} needs 'removed': true/false, got {entry!r}")
        widths = entry.get("widths")
        if entry["removed"]:
            continue
        if not isinstance(widths, list) or not all(type(w) is int and w >= 1 for w in widths):
            raise ArchitectureError(f"{file}: block entry {i} ({entry.get('stage')}.{entry.get('index')}) needs "
                                    f"'widths': a list of integers >= 1, got {widths!r}")
