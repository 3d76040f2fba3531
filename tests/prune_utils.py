"""Helpers that force random gates off (thetas set to 0/1) for surgery and counting tests."""

import torch

from cap.core.gates import set_gate_mode


def random_prune(model, block_drop: float, unit_drop: float, keep_one_block_per_stage: bool = False) -> None:
    """Set random layer thetas to 0 (prob block_drop) and random unit thetas to 0 (prob unit_drop),
    always leaving at least one unit per gate."""
    for block in model.blocks():
        block.layer_gate.theta.fill_(0.0 if torch.rand(()) < block_drop else 1.0)
        for gate in block.unit_gates():
            keep = (torch.rand(gate.size) >= unit_drop).float()
            keep[torch.randint(gate.size, ())] = 1.0
            gate.theta.copy_(keep)
    set_gate_mode(model, "deterministic")
