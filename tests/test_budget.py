"""Budget targets (cap.core.budget): the multiplier steers the expected cost to the target, hardening meets it."""

from __future__ import annotations

import pytest
import torch

from cap.core.budget import (
    BUDGET_TOLERANCE,
    Budget,
    BudgetError,
    check_reachable,
    fit_budget,
    goal_fraction,
    next_multiplier,
)
from cap.core.complexity import deterministic_values, expected_cost, ones_values
from cap.core.gates import gates_of
from cap.core.objective import ComplexityPenalty, ThetaSGD
from cap.core.rules import deterministic_plan, plan_removals
from cap.core.surgery import apply_plan
from cap.models import create_model


def ratio(model, kind: str, values=deterministic_values) -> float:
    return float(getattr(expected_cost(model, values), kind) / getattr(expected_cost(model, ones_values), kind))


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
@pytest.mark.parametrize("kind,target", [("macs", 0.3), ("macs", 0.5), ("macs", 0.7), ("params", 0.5)])
def test_fit_budget_lands_in_the_band(name, kind, target):
    torch.manual_seed(0)
    model = create_model(name, in_channels=1)
    for block in model.blocks():
        for gate in (block.layer_gate, *block.unit_gates()):
            gate.theta.copy_(0.4 + 0.6 * torch.rand_like(gate.theta))
    before = ratio(model, kind)
    switched = fit_budget(model, Budget(**{kind: target}), expected_cost(model, ones_values))
    after = ratio(model, kind)
    assert target - BUDGET_TOLERANCE <= after <= target, f"{kind} ratio {before:.3f} -> {after:.3f}"
    assert switched > 0


def test_fit_budget_measures_the_target_against_the_dense_start_not_the_pruned_network():
    """The search removes structures physically before hardening; the target is a fraction of the network the
    search started from, so fit_budget must not re-base it on what is left (a 0.4 target once ended at 0.32)."""
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1)
    dense = expected_cost(model, ones_values)
    gone = {g: torch.rand(g.size) < 0.2 for b in model.blocks() for g in b.unit_gates()}  # the search's removals
    apply_plan(model, plan_removals(list(model.blocks()), gone))
    for gate in gates_of(model):
        gate.theta.copy_(0.4 + 0.6 * torch.rand_like(gate.theta))
    fit_budget(model, Budget(macs=0.4), dense)
    apply_plan(model, deterministic_plan(list(model.blocks())))  # hardening's surgery
    final = float(expected_cost(model, ones_values).macs / dense.macs)
    assert 0.4 - BUDGET_TOLERANCE <= final <= 0.4, final


def test_fit_budget_switches_the_least_certain_first():
    model = create_model("resnet20", in_channels=1)
    gate = next(model.blocks()).gate1
    gate.theta[3] = 0.51  # the one kept structure with a theta near the threshold
    fit_budget(model, Budget(macs=ratio(model, "macs") - 0.002), expected_cost(model, ones_values))
    assert gate.theta[3] == 0 and bool((gate.theta[:3] == 1).all())


def test_fit_budget_switches_back_on_when_far_below():
    model = create_model("resnet20", in_channels=1)
    for block in model.blocks():
        block.gate1.theta[::2] = 0.45  # every other unit just below the threshold
    start = ratio(model, "macs")
    fit_budget(model, Budget(macs=start + 0.1), expected_cost(model, ones_values))
    assert start + 0.1 - BUDGET_TOLERANCE <= ratio(model, "macs") <= start + 0.1


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_the_multiplier_steers_the_search_to_the_target(target):
    """Mean theta dynamics with fixed importances: a structure goes to 0 where its weighted cost exceeds its
    importance. A fixed tau lands wherever the importances put it; the multiplier moves the cut to the target."""
    torch.manual_seed(1)
    model = create_model("resnet20", in_channels=1)
    penalty = ComplexityPenalty(model, tau=0.5, alpha=0.5, beta=0.5)
    theta_sgd = ThetaSGD(penalty.gamma0, eta=0.01)
    gammas0 = penalty.gammas()
    importance = {g: 2.0 * torch.rand_like(g.theta) * gammas0[g] for g in gammas0}
    budget, dense, multiplier, steps, every = Budget(macs=target), expected_cost(model, ones_values), 1.0, 3000, 50
    for step in range(steps):
        gammas = penalty.gammas()
        theta_sgd.step({g: -importance[g] for g in gammas}, gammas)
        if (step + 1) % every == 0:
            excess = budget.excess(expected_cost(model), dense, goal_fraction(step, 0, steps))
            multiplier = next_multiplier(multiplier, 1.0, excess)
            penalty.multiplier = multiplier
    assert abs(ratio(model, "macs", lambda g: g.theta) - target) < 0.03
    assert abs(ratio(model, "macs") - target) < 0.05  # the deterministic network is close too: fit_budget's part


def test_goal_and_multiplier_step():
    assert goal_fraction(100, 100, 1100) == 1.0 and goal_fraction(800, 100, 1100) == 0.0
    assert next_multiplier(1.0, 1.0, 0.1) > 1.0 > next_multiplier(1.0, 1.0, -0.1)
    assert next_multiplier(1e9, 1.0, 1.0) == 100.0  # bounded


def test_unreachable_targets_are_rejected():
    model = create_model("resnet20", in_channels=1)
    with pytest.raises(BudgetError, match="target_macs=0.001 is below"):
        check_reachable(model, Budget(macs=0.001), units=True, layers=True)
    with pytest.raises(BudgetError, match="no set of whole blocks"):
        check_reachable(model, Budget(macs=0.05), units=False, layers=True)  # the smallest block is 0.088
    with pytest.raises(BudgetError, match="prune.layers=false"):
        check_reachable(model, Budget(params=0.01), units=True, layers=False)
    check_reachable(model, Budget(macs=0.5, params=0.5), units=True, layers=True)


def test_fit_budget_reaches_the_target_when_everything_is_locked():
    """The keep rule may have locked every kept structure at theta 1: the least important per cost go first."""
    model = create_model("resnet20", in_channels=1)
    gates = [g for b in model.blocks() for g in (b.layer_gate, *b.unit_gates())]
    importance = {}
    for g in gates:
        g.locked.fill_(True)
        # unit 0 of each gate is the least important; blocks matter most
        importance[g] = torch.arange(1, g.size + 1, dtype=torch.float32) * (1e6 if g.kind == "layer" else 1.0)
    fit_budget(model, Budget(macs=0.9), expected_cost(model, ones_values), importance)
    assert 0.9 - BUDGET_TOLERANCE <= ratio(model, "macs") <= 0.9
    first = next(model.blocks()).gate1
    assert first.theta[0] == 0 and first.theta[-1] == 1 and not bool(first.locked[0])
