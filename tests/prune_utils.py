"""Test helpers: random gates forced off (thetas set to 0/1) for surgery and counting tests; a tiny pruned
network on one gloo rank for the data-parallel tests."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from cap.core.config import PruneConfig
from cap.core.gates import set_gate_mode
from cap.core.pruner import Pruner
from cap.engine.distributed import DistContext
from cap.models import create_model


@contextmanager
def gloo_rank_pruner(rank: int, world: int, init_file: str, steps: int, **prune) -> Iterator[tuple]:
    """(model, pruner, batches) on one gloo rank: a width-4 ResNet-20 on 8x8 inputs with a fast search
    (tau 2, no warm-up, a check every 5 steps; `prune` overrides) and `steps` random batches of this rank's
    own data."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = create_model("resnet20", width=4, num_classes=3, in_channels=1, input_size=8)
        cfg = PruneConfig(**{"tau": 2.0, "warmup_epochs": 0, "check_every": 5, "eta": 0.05, **prune})
        pruner = Pruner(model, cfg, steps_per_epoch=steps, epochs=1, sync=DistContext(rank=rank, world_size=world))
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        batches = [(torch.randn(8, 1, 8, 8, generator=data), torch.randint(0, 3, (8,), generator=data))
                   for _ in range(steps)]
        yield model, pruner, batches
    finally:
        dist.destroy_process_group()


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
