"""Gated residual blocks.

A block is `out = relu(shortcut(x) + xi_B * branch(x))`. The branch is a chain of conv -> BN
stages; every stage but the last is followed by ReLU and a unit gate on its output channels
(the block's internal channels). The last stage writes the residual stream and is not unit-gated.
A block gated off reduces to relu(shortcut(x)), so every block, downsampling ones included, can
be removed.

`GatedNet` is the contract between a network and the core (complexity, rules, surgery, pruner):
any nn.Module that meets it can be pruned; cap.models.GatedResNet is the one cap ships.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor, nn

from cap.core.gates import Gate


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv, nn.BatchNorm2d(cout)


class OptionAShortcut(nn.Module):
    """CIFAR ResNet shortcut 'A': subsample by `stride` and zero-pad the new channels (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class ProjectionShortcut(nn.Sequential):
    """Shortcut 'B': 1x1 conv + BN where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        super().__init__(conv, nn.BatchNorm2d(cout))


def make_shortcut(cin: int, cout: int, stride: int, kind: str) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return OptionAShortcut(cin, cout, stride) if kind == "A" else ProjectionShortcut(cin, cout, stride)


class GatedBlock(nn.Module):
    """A residual block whose branch is the chain conv{i} -> bn{i} [-> relu -> gate{i}]."""

    is_removed = False

    def __init__(self, channels: list[int], kernels: list[int], strides: list[int], shortcut: nn.Module):
        super().__init__()
        self.depth = len(kernels)
        for i in range(self.depth):
            conv, bn = conv_bn(channels[i], channels[i + 1], kernels[i], strides[i])
            setattr(self, f"conv{i + 1}", conv)
            setattr(self, f"bn{i + 1}", bn)
            if i < self.depth - 1:
                setattr(self, f"gate{i + 1}", Gate(channels[i + 1], "unit"))
        # No zero-init of the last BN scale: it would make every branch and unit look unimportant
        # (dL/dxi = 0) early in training, exactly when the gates start to move, and it slows short runs.
        self.layer_gate = Gate(1, "layer")
        self.shortcut = shortcut

    def stages(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, Gate | None]]:
        return [
            (getattr(self, f"conv{i + 1}"), getattr(self, f"bn{i + 1}"),
             getattr(self, f"gate{i + 1}") if i < self.depth - 1 else None)
            for i in range(self.depth)
        ]

    def unit_gates(self) -> list[Gate]:
        return [g for _, _, g in self.stages() if g is not None]

    def branch(self, x: Tensor) -> Tensor:
        for conv, bn, gate in self.stages():
            x = bn(conv(x))
            if gate is not None:
                x = gate(F.relu(x))
        return x

    def switched_off(self) -> bool:
        """Off in the deterministic network: its layer gate is off, or an internal layer keeps no unit (the
        branch would only add its last BN's shift; hardening and export remove such a block whole)."""
        gates = [g for g in [self.layer_gate, *self.unit_gates()] if g.active]
        return any(not bool(g.keep_mask().any()) for g in gates)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.layer_gate
        if gate.mode == "deterministic" and self.switched_off():
            return F.relu(self.shortcut(x))  # switched off: the branch is not computed at all
        return F.relu(self.shortcut(x) + gate(self.branch(x)))


class BasicBlock(GatedBlock):
    """Two 3x3 convs; the unit gate sits on conv1's outputs."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "A", mid: int | None = None):
        mid = cout if mid is None else mid
        super().__init__([cin, mid, cout], [3, 3], [stride, 1], make_shortcut(cin, cout, stride, shortcut))


class Bottleneck(GatedBlock):
    """1x1 -> 3x3 (stride) -> 1x1 with expansion 4; unit gates on conv1's and conv2's outputs."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        cout = planes * self.expansion
        super().__init__([cin, planes, planes, cout], [1, 3, 1], [1, stride, 1],
                         make_shortcut(cin, cout, stride, "B"))


class RemovedBlock(nn.Module):
    """What is left of a pruned block: relu(shortcut(x)). The branch's parameters are gone."""

    is_removed = True

    def __init__(self, shortcut: nn.Module) -> None:
        super().__init__()
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.shortcut(x))


@runtime_checkable
class GatedNet(Protocol):
    """What the core needs of a network, beyond being an nn.Module.

    - Its residual blocks sit in fixed slots (stage, index); a slot holds a `GatedBlock` while the block lives
      and a `RemovedBlock` once surgery removed it (`is_removed` tells which).
    - Every nn.Conv2d carries `out_hw`, its output height * width, set once by a forward pass at construction
      (GatedResNet.record_spatial_sizes): the complexity counter multiplies by it.
    - Everything outside the blocks' branches (stem, shortcuts, classifier) is ungated and counted as fixed cost.
    """

    def blocks(self) -> Iterator[GatedBlock]:
        """The live blocks, in forward order."""
        ...

    def block_slots(self) -> Iterator[tuple[int, int, nn.Module]]:
        """(stage, index, GatedBlock or RemovedBlock) for every slot, removed ones included."""
        ...

    def replace_block(self, block: GatedBlock, new: nn.Module) -> None:
        """Put `new` in the slot that holds `block` (surgery's block removal)."""
        ...
