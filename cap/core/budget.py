"""Budget targets: ask for a fraction of the dense MACs (or parameters) and get it in one run.

The multiplier. With a target t, tau is no longer a constant: it is the starting value of a multiplier
lambda on the pruning term, moved by dual ascent at every pruning check (never per step):

    lambda <- clip(lambda * exp(gain * (r(theta) - goal(step))), tau / LIMIT, tau * LIMIT)

r(theta) = F(theta) / F_0 (or P / P_0) is the exact expected cost ratio (cap.core.complexity). goal(step)
falls linearly from 1 at the end of the warm-up to t at RAMP of the search window (warm-up end to the
hardening deadline), then stays at t: the cut is asked for gradually, as gradual-pruning schedules do,
so lambda does not wind up while the thetas are still on their way down. The update is multiplicative
(lambda stays > 0, its steps are relative) and reads only thetas, which every rank holds identically, so
all ranks compute the same lambda. With both targets the larger relative excess drives it.

The budget at hardening. Hardening fixes the deterministic network, so that is where the target is met
exactly: `fit_budget` switches off the kept structures with the lowest theta until the cost is at or
below t (structures locked at theta 1 last, the least important per unit of cost first), and switches
back on the switched-off ones with the highest theta while they fit and the cost is more than
`tolerance` below t. Each round uses the exact marginal cost of every structure (the cost is affine in
each gate), then recomputes the cost. A structure is switched by setting its theta
to 0 or to KEEP_THETA, so hardening's own removal rule then does the surgery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cap.core.blocks import GatedNet
from cap.core.complexity import Complexity, branch_cost, deterministic_values, expected_cost, ones_values, static_cost
from cap.core.gates import KEEP_THETA, Gate

BUDGET_TOLERANCE = 0.02
"""a target t is reached when the final cost ratio is in [t - BUDGET_TOLERANCE, t]"""
GAIN = 2.0
"""dual-ascent gain: a relative excess of 0.1 over the goal multiplies lambda by exp(0.2) = 1.22 per check"""
LIMIT = 100.0
"""lambda stays within [tau / LIMIT, tau * LIMIT]"""
RAMP = 0.7
"""the goal reaches the target at this fraction of the search window"""


@dataclass
class Budget:
    """Targets as fractions of the dense network's cost; None: no target of that kind."""

    macs: float | None = None
    params: float | None = None

    def __bool__(self) -> bool:
        return self.macs is not None or self.params is not None

    def excess(self, cost: Complexity, dense: Complexity, goal: float = 0.0) -> float:
        """The largest (ratio - target) over the set targets, each target raised towards 1 by `goal`
        (0: the targets themselves, 1: the dense network)."""
        gaps = [float(value / reference) - (target + goal * (1 - target))
                for target, value, reference in ((self.macs, cost.macs, dense.macs),
                                                  (self.params, cost.params, dense.params)) if target is not None]
        return max(gaps)

    def ratios(self, cost: Complexity, dense: Complexity) -> dict[str, float]:
        return {"macs": float(cost.macs / dense.macs), "params": float(cost.params / dense.params)}


class BudgetError(ValueError):
    """No network the enabled gates can reach meets the target; the message names the target and the limit."""


def goal_fraction(step: int, start: int, deadline: int) -> float:
    """1 at the warm-up end `start`, falling linearly to 0 at RAMP of the way to `deadline`."""
    span = max(1.0, RAMP * (deadline - start))
    return max(0.0, 1.0 - (step - start) / span)


def next_multiplier(tau_now: float, tau0: float, excess: float) -> float:
    """One dual-ascent step on the pruning multiplier (see the module docstring)."""
    return min(tau0 * LIMIT, max(tau0 / LIMIT, tau_now * math.exp(GAIN * excess)))


def check_reachable(model: GatedNet, budget: Budget, units: bool, layers: bool) -> None:
    """Raise BudgetError where no choice of the enabled gates meets a target within BUDGET_TOLERANCE: below the
    ungated cost (stem, shortcuts, classifier), below one unit per internal layer without block gates, or, with
    block gates only, where no subset of whole blocks lands in [t - BUDGET_TOLERANCE, t]."""
    dense = expected_cost(model, ones_values)
    for kind, target in (("macs", budget.macs), ("params", budget.params)):
        if target is None:
            continue
        fixed = float(getattr(static_cost(model), kind) / getattr(dense, kind))
        branches = [float(getattr(branch_cost(b, ones_values), kind) / getattr(dense, kind)) for b in model.blocks()]
        if units:
            least = fixed if layers else float(getattr(expected_cost(model, _one_unit), kind) / getattr(dense, kind))
            if target < least:
                raise BudgetError(f"prune.target_{kind}={target:g} is below {least:.3f}, the smallest {kind} ratio "
                                  f"these gates can reach (prune.layers={str(layers).lower()}); ask for at least that")
        elif not layers or not _subset_sum_in(branches, target - BUDGET_TOLERANCE - fixed, target - fixed):
            raise BudgetError(f"prune.target_{kind}={target:g}: no set of whole blocks lands within "
                              f"{BUDGET_TOLERANCE:g} of it (prune.units=false; each block is "
                              f"{min(branches):.3f}-{max(branches):.3f} of the dense {kind}, the rest {fixed:.3f}); "
                              "choose another target or enable unit gates")


def _one_unit(gate: Gate) -> Tensor:
    """Every block kept with one unit in each internal layer."""
    if gate.kind == "layer":
        return torch.ones_like(gate.theta)
    one = torch.zeros_like(gate.theta)
    one[0] = 1.0
    return one


def _subset_sum_in(sizes: list[float], low: float, high: float, resolution: float = 1e-4) -> bool:
    """Whether some subset of `sizes` sums into [low, high] (dynamic programming on a 1e-4 grid)."""
    if high < 0:
        return False
    reachable = {0}
    for size in sizes:
        step = round(size / resolution)
        reachable |= {r + step for r in reachable if (r + step) * resolution <= high + resolution}
    return any(low - resolution <= r * resolution <= high + resolution for r in reachable)


def _structures(model: GatedNet) -> list[tuple[Gate, int]]:
    return [(g, i) for b in model.blocks() for g in (b.layer_gate, *b.unit_gates()) if g.active
            for i in range(g.size)]


def _marginals(model: GatedNet, budget: Budget, dense: Complexity) -> dict[Gate, Tensor]:
    """d(excess-driving cost)/d xi_s at the deterministic network, for every active gate (exact: the cost is
    affine in each gate). With both targets each kind is normalised by its dense value and summed."""
    gates = [g for b in model.blocks() for g in (b.layer_gate, *b.unit_gates()) if g.active]
    leaves = {g: deterministic_values(g).clone().requires_grad_(True) for g in gates}
    cost = expected_cost(model, lambda g: leaves.get(g, deterministic_values(g)))
    total = sum(value / reference for target, value, reference in ((budget.macs, cost.macs, dense.macs),
                (budget.params, cost.params, dense.params)) if target is not None)
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return {g: (d if d is not None else torch.zeros_like(g.theta)).detach() for g, d in zip(gates, grads, strict=True)}


@torch.no_grad()
def _switch(gate: Gate, index: int, on: bool) -> None:
    gate.theta[index] = max(float(gate.theta[index]), KEEP_THETA) if on else 0.0
    gate.locked[index] &= on


def fit_budget(model: GatedNet, budget: Budget, dense: Complexity, importance: dict[Gate, Tensor] | None = None,
               tolerance: float = BUDGET_TOLERANCE, rounds: int = 50) -> int:
    """Switch structures off (lowest theta first) or back on (highest theta first) until the deterministic
    network's cost is at or below every set target and within `tolerance` of the binding one, where switching
    can get it there; returns the number of structures switched. The targets are fractions of `dense`, the cost
    of the network the search started from (not of `model` now: the search may already have removed
    structures). Among equal thetas (structures the keep rule locked at 1, say) the one with the least
    `importance` (the pruner's windowed mean of -g) per unit of cost goes first and comes back last."""
    switched = 0
    for _ in range(rounds):
        excess = budget.excess(expected_cost(model, deterministic_values), dense)
        if -tolerance <= excess <= 0:
            break
        marginal = _marginals(model, budget, dense)
        on = excess < 0  # under budget by more than the tolerance: switch structures back on
        candidates = [(g, i) for g, i in _structures(model) if bool(g.theta[i] >= KEEP_THETA) != on
                      and float(marginal[g][i]) > 0]
        if not candidates:
            break

        candidates.sort(key=lambda gi, cost=marginal: _rank(gi, cost, importance), reverse=on)
        room = -excess - tolerance / 2 if on else excess  # aim inside the band, not at its edge
        picked = _pick(candidates, marginal, room, on)
        if not picked:
            break
        for g, i in picked:
            _switch(g, i, on)
        switched += len(picked)
    return switched


def _rank(gi: tuple[Gate, int], marginal: dict[Gate, Tensor],
          importance: dict[Gate, Tensor] | None) -> tuple[float, float]:
    """Lower theta first; among equal thetas, less importance per unit of cost first."""
    g, i = gi
    value = float(importance[g][i]) if importance is not None and g in importance else 0.0
    return float(g.theta[i]), value / float(marginal[g][i])


def _pick(candidates: list[tuple[Gate, int]], marginal: dict[Gate, Tensor], room: float,
          on: bool) -> list[tuple[Gate, int]]:
    """Off: the first candidates whose summed marginal cost covers `room`. On: those that fit in `room`."""
    picked, total = [], 0.0
    for g, i in candidates:
        cost = float(marginal[g][i])
        if on and total + cost > room:
            continue
        picked.append((g, i))
        total += cost
        if not on and total >= room:
            break
    return picked
