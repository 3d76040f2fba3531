"""BatchNorm re-estimation for the deterministic network.

With sampled gates the running statistics average over gate configurations; the deterministic
network (xi = 1[theta >= 0.5]) evaluated with them scores far below what its weights can do.
Before every evaluation, checkpoint and export, the statistics are re-estimated on a few training
batches with the deterministic gates (a cumulative average, momentum=None).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> int:
    """Reset and re-estimate every BN layer's running statistics; returns the batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(bn.momentum, bn.training) for bn in bns]
    was_training = model.training
    model.train()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    used = 0
    try:
        for images, _ in batches:
            model(images.to(device, non_blocking=True))
            used += 1
    finally:
        for bn, (momentum, _) in zip(bns, saved, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    return used
