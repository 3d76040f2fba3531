"""Pruning conditions: the domain-of-attraction check with layer-aware guards.

Mean dynamics: d theta_s / dt = -(Delta_s + w gamma_s), projected on [0, 1]. Once the importance
-Delta_s stays below the cost with theta_s near 0, theta_s and the structure's weights both flow
to 0, so removal does not change the limit. A structure is ready for removal when, at `patience`
consecutive checks,
  (a) theta_s <= theta_min, and
  (b) the mean of -g_s over the window since the last check is below (1 - margin) * w gamma_s.
A structure with theta near 0 but large importance is outside the basin: removing it would be
premature, so it stays (and, being sampled with probability `explore`, can still come back).

The keep rule is the mirror image (`prune.lock_kept`, on by default): a structure the deterministic network
keeps (theta >= 0.5) whose importance stays above (1 + margin) * w gamma_s for `patience` checks is
locked on: theta = 1, xi = 1 from then on. By the mean dynamics it is flowing to 1 anyway (the trapezoid
estimate does not depend on theta), its cost mostly falls later (a unit's gamma_s shrinks as the rest is
pruned; in a bottleneck it can also rise when the neighbouring layer's thetas do), and locking does not
change the deterministic network. What it buys is that a structure known to be kept stops being dropped
at random (the explore draws and the theta walk's excursions), which is dropout on the network in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from cap.core.blocks import GatedBlock
from cap.core.gates import KEEP_THETA, Gate


@dataclass
class RemovalPlan:
    blocks: list[tuple[GatedBlock, str]] = field(default_factory=list)  # (block, reason)
    units: list[tuple[GatedBlock, Gate, Tensor]] = field(default_factory=list)  # (block, gate, keep idx)

    def __bool__(self) -> bool:
        return bool(self.blocks or self.units)


class PruningMonitor:
    """Tracks the windowed mean importance of every gate and how long each sat in the basin of 0."""

    def __init__(self, theta_min: float, margin: float, patience: int) -> None:
        self.theta_min, self.margin, self.patience = theta_min, margin, patience
        self.grad_sum: dict[Gate, Tensor] = {}
        self.count: dict[Gate, int] = {}
        self.streak: dict[Gate, Tensor] = {}
        self.keep_streak: dict[Gate, Tensor] = {}
        self.skipped = torch.zeros((), dtype=torch.long)  # steps of this window whose gradients were not finite

    def observe(self, grads: dict[Gate, Tensor], finite: Tensor | None = None) -> None:
        """Add one step's gradients. A step that was not finite (`finite` False, its gradients zeroed) is counted
        on the device and taken off the step counts when they are read, so observing never reads the device."""
        seen = [gate for gate in grads if gate in self.grad_sum]
        if seen:  # one multi-tensor add for the running sums, not one per gate
            torch._foreach_add_([self.grad_sum[gate] for gate in seen], [grads[gate] for gate in seen])
        for gate, g in grads.items():
            if gate not in self.grad_sum:
                self.grad_sum[gate] = g.clone()  # owned: the sums are added to in place
            self.count[gate] = self.count.get(gate, 0) + 1
        if finite is not None:
            self.skipped = self.skipped + (~finite).long()

    def counts(self) -> dict[Gate, int]:
        """The finite steps each gate has seen in this window (one host read)."""
        skipped = int(self.skipped)
        return {gate: n - skipped for gate, n in self.count.items()}

    def ready(self, gammas: dict[Gate, Tensor]) -> tuple[dict[Gate, Tensor], dict[Gate, Tensor]]:
        """Update the streaks from the window that just ended; return (gate -> bool mask of structures ready
        for removal, gate -> bool mask of structures ready to be locked on)."""
        remove, lock = {}, {}
        counts = self.counts()
        for gate, total in self.grad_sum.items():
            if counts[gate] == 0:  # every step of the window was skipped: nothing learnt, streaks unchanged
                continue
            importance = -total / counts[gate]
            inside = (gate.theta <= self.theta_min) & (importance < (1 - self.margin) * gammas[gate])
            remove[gate] = self._count(self.streak, gate, inside)
            # the keep rule locks only what the deterministic network keeps
            on = (gate.theta >= KEEP_THETA) & (importance > (1 + self.margin) * gammas[gate])
            lock[gate] = self._count(self.keep_streak, gate, on & ~gate.locked)
        self.grad_sum.clear()
        self.count.clear()
        self.skipped = torch.zeros((), dtype=torch.long)
        return remove, lock

    def _count(self, table: dict[Gate, Tensor], gate: Gate, inside: Tensor) -> Tensor:
        streak = table.get(gate, torch.zeros_like(gate.theta, dtype=torch.long))
        table[gate] = torch.where(inside, streak + 1, torch.zeros_like(streak))
        return table[gate] >= self.patience

    def importance(self) -> dict[Gate, Tensor]:
        """The mean importance -g of every gate over the window so far (gates without a step in it are left out)."""
        counts = self.counts()
        return {gate: -total / counts[gate] for gate, total in self.grad_sum.items() if counts[gate]}

    def keep_only(self, gate: Gate, keep: Tensor) -> None:
        for table in (self.streak, self.keep_streak, self.grad_sum):
            if gate in table:
                table[gate] = table[gate][keep]

    def forget(self, gates: list[Gate]) -> None:
        for gate in gates:
            for table in (self.streak, self.keep_streak, self.grad_sum, self.count):
                table.pop(gate, None)


def plan_removals(blocks: list[GatedBlock], remove: dict[Gate, Tensor]) -> RemovalPlan:
    """Turn per-gate removal masks into a plan, with the layer-aware guards.

    A block goes when its layer gate says so, or when one of its unit gates would lose every
    channel: an empty internal layer leaves the branch adding only its last BN's shift (a
    constant), so the block is removed as a whole and counted as layer pruning. A block never
    keeps zero units.
    """
    plan = RemovalPlan()
    for block in blocks:
        if bool(remove.get(block.layer_gate, torch.zeros(1, dtype=torch.bool)).any()):
            plan.blocks.append((block, "layer gate"))
            continue
        unit_plans = []
        for gate in block.unit_gates():
            mask = remove.get(gate)
            if mask is None or not bool(mask.any()):
                continue
            if bool(mask.all()):
                plan.blocks.append((block, "all units pruned"))
                unit_plans = []
                break
            unit_plans.append((block, gate, (~mask).nonzero().squeeze(1)))
        plan.units.extend(unit_plans)
    return plan


def deterministic_plan(blocks: list[GatedBlock]) -> RemovalPlan:
    """The removals that make the deterministic network (xi = 1[theta >= 0.5]) physical: used by hardening
    and by export."""
    remove = {g: ~g.keep_mask() for b in blocks for g in [b.layer_gate, *b.unit_gates()] if g.active}
    return plan_removals(blocks, remove)
