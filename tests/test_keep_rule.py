"""The keep rule (prune.lock_kept): the domain of attraction of 1, mirror image of the removal rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cap.core.arch import architecture
from cap.core.gates import Gate, gates_of
from cap.core.pruner import Pruner
from cap.core.rules import PruningMonitor
from cap.engine.config import PruneConfig
from cap.engine.loop import new_meter
from cap.engine.state import migrate
from cap.models import create_model


def _monitor_after(importance: torch.Tensor, theta: torch.Tensor, gamma: float, checks: int) -> torch.Tensor:
    gate = Gate(len(theta), "unit")
    gate.theta.copy_(theta)
    monitor = PruningMonitor(theta_min=0.01, margin=0.2, patience=2)
    lock = None
    for _ in range(checks):
        monitor.observe({gate: -importance})
        _, lock = monitor.ready({gate: torch.full_like(theta, gamma)})
    return lock[gate]


def test_a_kept_structure_locks_only_with_importance_clearly_above_cost_for_patience_checks():
    # importance / cost: 2.0 (lock, also at theta 0.6), 1.1 (inside the margin: stays free), 2.0 but
    # theta 0.4 (the deterministic network drops it: locking would change the structure, so it waits)
    importance = torch.tensor([2.0, 2.0, 1.1, 2.0])
    theta = torch.tensor([1.0, 0.6, 1.0, 0.4])
    assert _monitor_after(importance, theta, gamma=1.0, checks=1).tolist() == [False] * 4
    assert _monitor_after(importance, theta, gamma=1.0, checks=2).tolist() == [True, True, False, False]


def test_a_broken_streak_starts_again():
    gate = Gate(1, "unit")
    monitor = PruningMonitor(theta_min=0.01, margin=0.2, patience=2)
    gamma = {gate: torch.ones(1)}
    for importance, expected in [(2.0, False), (0.5, False), (2.0, False), (2.0, True)]:
        monitor.observe({gate: torch.tensor([-importance])})
        assert bool(monitor.ready(gamma)[1][gate]) is expected


def test_a_locked_structure_is_never_dropped_and_the_others_still_are():
    gate = Gate(2, "unit")
    gate.mode, gate.generator = "sample", torch.Generator().manual_seed(0)
    gate.locked[0] = True
    gate(torch.ones(4000, 2, 1, 1))
    xi = gate.xi.detach()
    assert bool((xi[:, 0] == 1).all()), "a locked unit must be on for every example"
    assert 0.03 < float((xi[:, 1] == 0).float().mean()) < 0.07, "an unlocked unit at theta 1 is explored 5 %"


KW = {"width": 4, "num_classes": 3, "in_channels": 1, "input_size": 8}


def _pruner(lock_kept: bool) -> tuple[torch.nn.Module, Pruner]:
    torch.manual_seed(0)
    model = create_model("resnet20", **KW)
    cfg = PruneConfig(tau=1.0, warmup_epochs=0, eta=0.05, check_every=5, lock_kept=lock_kept)
    return model, Pruner(model, cfg, steps_per_epoch=100, epochs=1)


def _train(model: torch.nn.Module, pruner: Pruner, steps: int, important: Gate, ratio: float = 10.0,
           keep: Gate | None = None) -> list:
    """Real forward/backward steps; `important`'s estimated importance is forced to `ratio` x its cost (and
    `keep`'s, e.g. its block's layer gate, to 10x, so that the block stays). Returns `important`'s draws."""
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    draws = []
    for _ in range(steps):
        pruner.before_forward()
        F.cross_entropy(model(x), y).backward()
        assert important.xi is not None, "the block holding the gate under test must stay"
        draws.append(important.xi.detach().clone())
        gammas = pruner.penalty.gammas()
        for gate, r in [(important, ratio), (keep, 10.0)]:
            if gate is None:
                continue
            # dL/dxi such that the trapezoid estimate is -r * gamma for every structure of this gate
            gate.xi.grad = ((-2 * r * gammas[gate] / len(gate.xi)) * torch.where(
                gate.xi > 0.5, gate.p_on, 1 - gate.p_on).detach().expand_as(gate.xi)).to(gate.xi.dtype)
        pruner.after_step()
    return draws


def test_pruner_locks_important_units_keeps_them_at_one_and_checkpoints_the_lock():
    model, pruner = _pruner(lock_kept=True)
    block = next(iter(model.blocks()))
    important = block.unit_gates()[0]
    _train(model, pruner, steps=12, important=important, keep=block.layer_gate)
    assert bool(important.locked.all()), "10x its cost at theta 1 for two checks: locked"
    assert pruner.stats()["theta_locked"] >= important.size
    # once locked, a zero importance (the cost alone pulls) no longer moves it, drops it or removes it
    draws = _train(model, pruner, steps=15, important=important, ratio=0.0, keep=block.layer_gate)
    assert bool((important.theta == 1).all()) and important.size == 4
    assert all(bool((d == 1).all()) for d in draws)
    unlocked, unlocked_pruner = _pruner(lock_kept=False)  # the same pull without the rule moves theta down
    free_block = next(iter(unlocked.blocks()))
    free = free_block.unit_gates()[0]
    _train(unlocked, unlocked_pruner, steps=15, important=free, ratio=0.0, keep=free_block.layer_gate)
    assert float(free.theta.max()) < 1
    # the lock is part of the pruner's checkpoint; a fresh pruner restores it by gate name
    saved = pruner.state_dict()
    twin, twin_pruner = _pruner(lock_kept=True)
    twin_pruner.shrink_to(architecture(model, "resnet20", KW))  # what resume does: replay the removals, then load
    twin.load_state_dict(model.state_dict())
    twin_pruner.load_state_dict(saved)
    assert [g.locked.tolist() for g in gates_of(twin)] == [g.locked.tolist() for g in gates_of(model)]
    # a checkpoint written before the keep rule existed has no lock table: migrated and loaded, it leaves nothing
    # locked, even in a pruner that had locks
    saved.pop("locked")
    saved["monitor"].pop("keep_streak")
    legacy = {"format": 1, "world_size": 1, "meter": new_meter(), "config": {"prune": {}}, "pruner": saved}
    twin_pruner.load_state_dict(migrate(legacy)["pruner"])
    assert not any(bool(g.locked.any()) for g in gates_of(twin))


def test_without_the_rule_nothing_locks():
    model, pruner = _pruner(lock_kept=False)
    block = next(iter(model.blocks()))
    _train(model, pruner, steps=12, important=block.unit_gates()[0], keep=block.layer_gate)
    assert not any(bool(g.locked.any()) for g in gates_of(model))


def test_surgery_slices_the_lock_with_the_thetas():
    from cap.core.surgery import remove_units

    model, _ = _pruner(lock_kept=True)
    block = next(iter(model.blocks()))
    gate = block.unit_gates()[0]
    gate.locked[1] = True
    remove_units(block, gate, torch.tensor([1, 3]))
    assert gate.locked.tolist() == [True, False] and gate.theta.numel() == 2
