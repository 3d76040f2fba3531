"""A tiny gated network (one basic block: 3 unit gates + 1 layer gate) whose gates can be enumerated."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from cap.core.blocks import BasicBlock
from cap.core.gates import Gate


class TinyNet(nn.Module):
    def __init__(self, mid: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = BasicBlock(4, 4, stride=1, mid=mid)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(F.relu(self.stem(x))).mean((2, 3)))

    def gates(self) -> list[Gate]:
        return [self.block.gate1, self.block.layer_gate]


def flat_thetas(net: TinyNet) -> torch.Tensor:
    return torch.cat([g.theta for g in net.gates()])


def set_thetas(net: TinyNet, values: torch.Tensor) -> None:
    i = 0
    for g in net.gates():
        g.theta.copy_(values[i:i + g.size])
        i += g.size


def loss_and_grad_at(net: TinyNet, config: torch.Tensor, x, y) -> tuple[float, torch.Tensor]:
    """Loss and dL/dxi with the gates forced to the 0/1 vector `config` (batch-shared)."""
    saved = flat_thetas(net).clone()
    for g in net.gates():
        g.mode, g.explore, g.per_example = "sample", 0.0, False
    set_thetas(net, config)  # Bern(0) = 0 and Bern(1) = 1: the sample IS the config, with grad
    net.zero_grad()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    grad = torch.cat([g.xi.grad.reshape(-1) for g in net.gates()])
    set_thetas(net, saved)
    return float(loss.detach()), grad


def enumerate_configs(n: int):
    for bits in itertools.product([0.0, 1.0], repeat=n):
        yield torch.tensor(bits)


def config_weight(config: torch.Tensor, p_on: torch.Tensor) -> float:
    return float(torch.where(config > 0.5, p_on, 1 - p_on).prod())
