"""Complexity-aware training, as one object a training loop drives.

Per step:   before_forward()  -> gates sampled (or dense during warm-up / after hardening)
            loss.backward(); optimizer.step()
            after_step()      -> theta step from the trapezoid estimator, pruning check, surgery
Per epoch:  end_epoch()       -> hardening once the structure is stable or at `harden_at`
Evaluation: deterministic()   -> xi = 1[theta >= 0.5]

It imports nothing from the trainer, tracking, sweeps or launchers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cap.complexity import deterministic_values, expected_cost, ones_values
from cap.config import PruneConfig
from cap.gates import Gate, gates_of, set_gate_mode
from cap.objective import ComplexityPenalty, ThetaSGD
from cap.pruning import PruningMonitor, RemovalPlan, plan_removals
from cap.surgery import remove_block, remove_units


@dataclass
class PruneEvent:
    step: int
    kind: str  # "block" | "units"
    where: str  # e.g. "stage1.block2"
    detail: str


@dataclass
class PrunerState:
    step: int = 0
    hardened: bool = False
    harden_step: int | None = None
    undecided_at_harden: int | None = None
    stable_epochs: int = 0
    last_structure: tuple | None = None
    events: list[PruneEvent] = field(default_factory=list)


class Pruner:
    """Drives gates, thetas, pruning checks, surgery and hardening for one gated model."""

    def __init__(self, model: nn.Module, cfg: PruneConfig, steps_per_epoch: int, epochs: int,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model, self.cfg, self.optimizer = model, cfg, optimizer
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.enabled = cfg.tau > 0
        self.state = PrunerState(hardened=not self.enabled)
        for gate in gates_of(model):
            gate.explore = cfg.explore
            gate.per_example = cfg.sampling == "example"
            gate.active = self.enabled and (cfg.units if gate.kind == "unit" else cfg.layers)
        self.dense = expected_cost(model, ones_values)
        self.names = {id(b): f"stage{s + 1}.block{i + 1}" for s, i, b in model.block_slots()}
        self.layers_total = sum(1 for _ in model.blocks())
        self.units_total = sum(g.size for b in model.blocks() for g in b.unit_gates())
        self.units_of = {id(b): sum(g.size for g in b.unit_gates()) for b in model.blocks()}
        self.warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        if self.enabled:
            self.penalty = ComplexityPenalty(model, cfg.tau, cfg.alpha, cfg.beta, cfg.layer_cost)
            self.theta_sgd = ThetaSGD(self.penalty.gamma0, cfg.eta)
            self.monitor = PruningMonitor(cfg.theta_min, cfg.margin, cfg.patience)

    # ------------------------------------------------------------------ per step
    @property
    def sampling(self) -> bool:
        return self.enabled and not self.state.hardened and self.state.step >= self.warmup_steps

    def before_forward(self) -> None:
        set_gate_mode(self.model, "sample" if self.sampling else "dense")

    def after_step(self) -> list[PruneEvent]:
        """Call after optimizer.step(): theta step, and every `check_every` steps a pruning check."""
        events: list[PruneEvent] = []
        if self.sampling:
            grads = {g: gr for g in self.active_gates() if (gr := g.trapezoid_grad()) is not None}
            gammas = self.penalty.gammas()
            self.theta_sgd.step(grads, gammas)
            self.monitor.observe(grads)
            if (self.state.step - self.warmup_steps + 1) % self.cfg.check_every == 0:
                events = self.apply(plan_removals(list(self.model.blocks()), self.monitor.ready(gammas)))
        for gate in gates_of(self.model):
            gate.clear()
        self.state.step += 1
        return events

    def active_gates(self) -> list[Gate]:
        return [g for b in self.model.blocks() for g in [b.layer_gate, *b.unit_gates()] if g.active]

    # ------------------------------------------------------------------ surgery
    def apply(self, plan: RemovalPlan) -> list[PruneEvent]:
        events = []
        for block, gate, keep in plan.units:
            removed = gate.size - len(keep)
            remove_units(block, gate, keep, self.optimizer)
            if self.enabled:
                self.monitor.keep_only(gate, keep)
            events.append(PruneEvent(self.state.step, "units", self.names[id(block)],
                                     f"-{removed} units, {gate.size} left"))
        for block, reason in plan.blocks:
            if self.enabled:
                self.monitor.forget([block.layer_gate, *block.unit_gates()])
            removed = remove_block(self.model, block, self.optimizer)
            self.names[id(removed)] = self.names[id(block)]
            self.units_of[id(removed)] = self.units_of[id(block)]
            events.append(PruneEvent(self.state.step, "block", self.names[id(block)], reason))
        self.state.events.extend(events)
        return events

    # ------------------------------------------------------------------ per epoch
    def structure(self) -> tuple:
        """The deterministic structure: kept units per block, 0 for a block switched off or removed."""
        out = []
        for _, _, block in self.model.block_slots():
            if block.is_removed or (block.layer_gate.active and not bool(block.layer_gate.keep_mask())):
                out.append(0)
            else:
                out.append(tuple(int(g.keep_mask().sum()) if g.active else g.size for g in block.unit_gates()))
        return tuple(out)

    def end_epoch(self, epoch: int) -> list[PruneEvent]:
        """Harden when the structure has been stable for `harden_patience` epochs, or at `harden_at`."""
        if not self.enabled or self.state.hardened:
            return []
        structure = self.structure()
        # stability counts only once a zero-importance structure has had time to reach 0
        settle = self.warmup_steps + 1.0 / self.cfg.eta
        if self.state.step >= settle and structure == self.state.last_structure:
            self.state.stable_epochs += 1
        else:
            self.state.stable_epochs = 0
        self.state.last_structure = structure
        at_deadline = self.cfg.harden_at is not None and (epoch + 1) >= self.cfg.harden_at * self.epochs
        stable = self.cfg.harden_patience is not None and self.state.stable_epochs >= self.cfg.harden_patience
        # hardening is only meaningful if there is training left for the fixed network
        if (at_deadline or stable) and epoch + 1 < self.epochs:
            return self.harden()
        return []

    def harden(self) -> list[PruneEvent]:
        """Fix the deterministic network: theta < 0.5 removed, the rest set to 1 and ungated."""
        self.state.undecided_at_harden = self.undecided()
        remove = {g: ~g.keep_mask() for g in self.active_gates()}
        events = self.apply(plan_removals(list(self.model.blocks()), remove))
        for gate in gates_of(self.model):
            gate.theta.fill_(1.0)
            gate.active = False
        self.state.hardened, self.state.harden_step = True, self.state.step
        set_gate_mode(self.model, "dense")
        return events

    # ------------------------------------------------------------------ evaluation and reporting
    def deterministic(self) -> None:
        set_gate_mode(self.model, "deterministic")

    def undecided(self, low: float = 0.05, high: float = 0.95) -> int:
        return int(sum(((g.theta > low) & (g.theta < high)).sum() for g in self.active_gates()))

    def block_structure(self) -> list[dict]:
        """Per block position: kept by the deterministic network?, internal units kept, of how many."""
        out = []
        for _, _, block in self.model.block_slots():
            off = block.is_removed or (block.layer_gate.active and not bool(block.layer_gate.keep_mask()))
            units = 0 if off else sum(int(deterministic_values(g).sum()) for g in block.unit_gates())
            of = self.units_of[id(block)]
            out.append({"name": self.names[id(block)], "kept": not off, "units": units, "of": of})
        return out

    def stats(self) -> dict:
        final = expected_cost(self.model, deterministic_values)
        structure = self.block_structure()
        return {
            "macs_dense": int(self.dense.macs), "macs_final": int(round(float(final.macs))),
            "params_dense": int(self.dense.params), "params_final": int(round(float(final.params))),
            "mac_ratio": float(final.macs / self.dense.macs),
            "param_ratio": float(final.params / self.dense.params),
            "layers_total": self.layers_total, "layers_kept": sum(b["kept"] for b in structure),
            "units_total": self.units_total, "units_kept": sum(b["units"] for b in structure),
            "theta_undecided": self.undecided(),
            "structure": structure,
        }
