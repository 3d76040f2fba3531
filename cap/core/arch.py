"""The surviving architecture as plain data.

`architecture(model)` gives a JSON-able architecture (registry name, constructor arguments, per block:
removed or its internal widths); `removal_plan_for(model, arch)` is the plan that turns a dense model
into that architecture (cap.models.build_from_architecture applies it to a freshly created model, so a
state_dict of the shrunken network loads without shape errors).
"""

from __future__ import annotations

import copy

import torch

from cap.core.blocks import GatedNet
from cap.core.rules import RemovalPlan, deterministic_plan
from cap.core.surgery import apply_plan


def architecture(model: GatedNet, name: str, kwargs: dict) -> dict:
    blocks = []
    for stage, index, block in model.block_slots():
        entry = {"stage": stage, "index": index, "removed": bool(block.is_removed)}
        if not block.is_removed:
            entry["widths"] = [g.size for g in block.unit_gates()]
        blocks.append(entry)
    return {"name": name, "kwargs": dict(kwargs), "blocks": blocks}


def removal_plan_for(model: GatedNet, arch: dict) -> RemovalPlan:
    """The removals that turn the dense `model` into the architecture `arch` (validated against it)."""
    slots = list(model.block_slots())
    if len(slots) != len(arch["blocks"]):
        raise ValueError(f"architecture lists {len(arch['blocks'])} blocks, model '{arch['name']}' has {len(slots)}")
    plan = RemovalPlan()
    for (_, _, block), entry in zip(slots, arch["blocks"], strict=True):
        if block.is_removed:  # a model built from a pruned architecture (model.arch) starts without it
            if not entry["removed"]:
                raise ValueError(f"block {entry['stage']}.{entry['index']} is removed in the model but kept in "
                                 "the architecture")
            continue
        if entry["removed"]:
            plan.blocks.append((block, "restored"))
            continue
        gates = block.unit_gates()
        if len(entry["widths"]) != len(gates):
            raise ValueError(f"block {entry['stage']}.{entry['index']}: {len(entry['widths'])} widths for "
                             f"{len(gates)} gated layers")
        for gate, width in zip(gates, entry["widths"], strict=True):
            if not 1 <= width <= gate.size:
                raise ValueError(f"block {entry['stage']}.{entry['index']}: width {width} outside 1..{gate.size}")
            if width < gate.size:
                plan.units.append((block, gate, torch.arange(width)))
    return plan


def drop_switched_off(model: GatedNet) -> None:
    """Physically remove what the deterministic network switches off, so that every gate left is all-ones."""
    apply_plan(model, deterministic_plan(list(model.blocks())))


def deterministic_architecture(model: GatedNet, name: str, kwargs: dict) -> dict:
    """The architecture of `model`'s deterministic network (the model itself is left untouched)."""
    shrunk = copy.deepcopy(model)
    drop_switched_off(shrunk)
    return architecture(shrunk, name, kwargs)
