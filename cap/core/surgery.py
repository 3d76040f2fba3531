"""Physical removal of units and blocks, carrying the optimiser state of the survivors.

Units: slice the producing conv's output channels, its BN (affine and running statistics), the
consuming conv's input channels and the gate's thetas. Blocks: replace the block by
relu(shortcut(x)) and drop its parameters from the optimiser. Every optimiser state tensor shaped
like its parameter (SGD momentum, Adam moments) is sliced with it; scalar state (Adam's step) is
kept, so no survivor loses its history.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cap.core.blocks import GatedBlock, GatedNet, RemovedBlock
from cap.core.gates import Gate
from cap.core.rules import RemovalPlan


def _swap_parameter(module: nn.Module, name: str, new_data: Tensor, optimizer, index) -> None:
    old = getattr(module, name)
    new = nn.Parameter(new_data.clone(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            k: (v[index].clone() if torch.is_tensor(v) and v.shape == old.shape else v) for k, v in state.items()
        }


def _slice_out(conv: nn.Conv2d, keep: Tensor, optimizer) -> None:
    _swap_parameter(conv, "weight", conv.weight.data[keep], optimizer, (keep,))
    if conv.bias is not None:
        _swap_parameter(conv, "bias", conv.bias.data[keep], optimizer, (keep,))
    conv.out_channels = len(keep)


def _slice_in(conv: nn.Conv2d, keep: Tensor, optimizer) -> None:
    _swap_parameter(conv, "weight", conv.weight.data[:, keep], optimizer, (slice(None), keep))
    conv.in_channels = len(keep)


def _slice_bn(bn: nn.BatchNorm2d, keep: Tensor, optimizer) -> None:
    _swap_parameter(bn, "weight", bn.weight.data[keep], optimizer, (keep,))
    _swap_parameter(bn, "bias", bn.bias.data[keep], optimizer, (keep,))
    bn.running_mean = bn.running_mean[keep].clone()
    bn.running_var = bn.running_var[keep].clone()
    bn.num_features = len(keep)


def remove_units(block: GatedBlock, gate: Gate, keep: Tensor, optimizer=None) -> None:
    """Keep only the channels `keep` (sorted long indices) of the unit gate `gate` in `block`."""
    stages = block.stages()
    idx = next(i for i, (_, _, g) in enumerate(stages) if g is gate)
    if len(keep) == 0:
        raise ValueError("remove_units would empty the block: remove the block instead")
    producer, bn, _ = stages[idx]
    consumer = stages[idx + 1][0]
    _slice_out(producer, keep, optimizer)
    _slice_bn(bn, keep, optimizer)
    _slice_in(consumer, keep, optimizer)
    gate.theta = gate.theta[keep].clone()
    gate.locked = gate.locked[keep].clone()


def remove_block(model: GatedNet, block: GatedBlock, optimizer=None) -> RemovedBlock:
    """Replace `block` by its shortcut; its branch parameters leave the optimiser."""
    if optimizer is not None:
        shortcut_params = {id(p) for p in block.shortcut.parameters()}
        gone = {id(p) for p in block.parameters()} - shortcut_params
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in gone]
        for p in [p for p in optimizer.state if id(p) in gone]:
            del optimizer.state[p]
    removed = RemovedBlock(block.shortcut)
    model.replace_block(block, removed)
    return removed


def apply_plan(model: GatedNet, plan: RemovalPlan, optimizer=None) -> list[tuple[GatedBlock, RemovedBlock]]:
    """Carry out `plan`: units first, then whole blocks; returns each removed block with what replaced it."""
    for block, gate, keep in plan.units:
        remove_units(block, gate, keep, optimizer)
    return [(block, remove_block(model, block, optimizer)) for block, _ in plan.blocks]
