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
from typing import Any

import torch
from torch import Tensor

from cap.core.arch import removal_plan_for
from cap.core.blocks import GatedNet
from cap.core.budget import BUDGET_TOLERANCE, Budget, check_reachable, fit_budget, goal_fraction, next_multiplier
from cap.core.complexity import deterministic_values, expected_cost, ones_values
from cap.core.config import PruneConfig
from cap.core.gates import KEEP_THETA, Gate, gates_of, set_gate_mode
from cap.core.objective import ComplexityPenalty, ThetaSGD
from cap.core.rules import PruningMonitor, RemovalPlan, deterministic_plan, plan_removals
from cap.core.surgery import apply_plan
from cap.core.sync import RankSync, digest_tensors


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
    locked_at_harden: int | None = None
    stable_epochs: int = 0
    last_structure: tuple | None = None
    multiplier: float = 1.0  # tau_now / tau: a budget target moves it at pruning checks
    budget_switched: int | None = None  # structures fit_budget switched at hardening
    events: list[PruneEvent] = field(default_factory=list)


class Pruner:
    """Drives gates, thetas, pruning checks, surgery and hardening for one gated model.

    Under data parallelism pass `sync`: theta gradients are averaged over ranks before every theta
    step, and every pruning decision is checked to be identical on all ranks before surgery."""

    def __init__(self, model: GatedNet, cfg: PruneConfig, steps_per_epoch: int, epochs: int,
                 optimizer: torch.optim.Optimizer | None = None, sync: RankSync | None = None,
                 seed: int = 0) -> None:
        self.model, self.cfg, self.optimizer, self.sync = model, cfg, optimizer, sync
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.enabled = cfg.tau > 0
        self.state = PrunerState(hardened=not self.enabled)
        gates = gates_of(model)
        device = gates[0].theta.device if gates else torch.device("cpu")
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        shard = (sync.rank, sync.world_size) if sync is not None else (0, 1)
        for gate in gates:
            gate.explore, gate.sample_fraction = cfg.explore, cfg.sample_fraction
            gate.per_example = cfg.sampling == "example"
            gate.active = self.enabled and (cfg.units if gate.kind == "unit" else cfg.layers)
            gate.generator, gate.shard = self.generator, shard
        self.skipped_steps = torch.zeros((), dtype=torch.long)  # a device counter: read at checkpoints only
        self.dense = expected_cost(model, ones_values)
        self.names = {id(b): f"stage{s + 1}.block{i + 1}" for s, i, b in model.block_slots()}
        self.layers_total = sum(1 for _ in model.blocks())
        self.units_total = sum(g.size for b in model.blocks() for g in b.unit_gates())
        # a block already removed when the pruner starts (a model built from a pruned architecture) counts 0
        self.units_of = {id(b): 0 if b.is_removed else sum(g.size for g in b.unit_gates())
                         for _, _, b in model.block_slots()}
        self.warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        self.budget = Budget(cfg.target_macs, cfg.target_params) if self.enabled else Budget()
        if self.budget:
            check_reachable(model, self.budget, cfg.units, cfg.layers)
            self.deadline = round((cfg.harden_at or 1.0) * epochs * steps_per_epoch)
        if self.enabled:
            self.penalty = ComplexityPenalty(model, cfg.tau, cfg.alpha, cfg.beta, cfg.layer_cost)
            self.theta_sgd = ThetaSGD(self.penalty.gamma0, cfg.eta, cfg.step_norm)
            self.monitor = PruningMonitor(cfg.theta_min, cfg.margin, cfg.patience)

    # ------------------------------------------------------------------ per step
    @property
    def sampling(self) -> bool:
        return self.enabled and not self.state.hardened and self.state.step >= self.warmup_steps

    def before_forward(self) -> None:
        set_gate_mode(self.model, "sample" if self.sampling else "dense")

    def after_step(self, grad_scale: float = 1.0) -> list[PruneEvent]:
        """Call after optimizer.step(): theta step, and every `check_every` steps a pruning check.

        `grad_scale` is the loss scale of fp16 mixed precision (the gate gradients carry it too); a step
        whose gate gradients are not finite (the scaler skipped it) leaves the thetas alone."""
        events: list[PruneEvent] = []
        if self.sampling:
            grads, finite = self._gate_grads(grad_scale)
            gammas = self.penalty.gammas()
            self.theta_sgd.step(grads, gammas, finite)
            if self.cfg.lock_kept:  # locked thetas stay at 1
                for gate in grads:
                    gate.theta.masked_fill_(gate.locked, 1.0)
            self.monitor.observe(grads, finite)
            self.skipped_steps = self.skipped_steps + (~finite).long()
            if (self.state.step - self.warmup_steps + 1) % self.cfg.check_every == 0:
                if self.budget:
                    self._steer_multiplier()
                remove, lock = self.monitor.ready(gammas)
                if self.cfg.lock_kept:
                    for gate, mask in lock.items():
                        gate.locked |= mask
                        gate.theta.masked_fill_(mask, 1.0)
                plan = plan_removals(list(self.model.blocks()), remove)
                self._check_agreement(f"the pruning check at step {self.state.step}", plan)
                events = self.apply(plan)
        for gate in gates_of(self.model):
            gate.clear()
        self.state.step += 1
        return events

    def _steer_multiplier(self) -> None:
        """One dual-ascent step of the budget multiplier (cap.core.budget): host work at checks only."""
        goal = goal_fraction(self.state.step, self.warmup_steps, self.deadline)
        excess = self.budget.excess(expected_cost(self.model), self.dense, goal)
        self.state.multiplier = next_multiplier(self.state.multiplier, 1.0, excess)
        self.penalty.multiplier = self.state.multiplier

    def _gate_grads(self, grad_scale: float) -> tuple[dict[Gate, Tensor], Tensor]:
        """Trapezoid gradients of the active gates, unscaled and averaged over ranks, and whether all are finite
        (a 0-d bool tensor, never read on the host here); a step that is not finite comes back zeroed."""
        gates = self.active_gates()
        raw = {g: g.trapezoid_grad() for g in gates}
        ddp = self.sync is not None and self.sync.world_size > 1
        # under DDP one flat all-reduce, where a gate without a gradient on this rank contributes zeros
        present = gates if ddp else [g for g in gates if raw[g] is not None]
        flat = torch.cat([raw[g] if raw[g] is not None else torch.zeros_like(g.theta) for g in present]
                         or [torch.zeros(0)])
        flat = (self.sync.average(flat) if ddp else flat) / grad_scale
        finite = torch.isfinite(flat).all()
        flat = torch.where(finite, flat, torch.zeros_like(flat))
        return dict(zip(present, flat.split([g.size for g in present]), strict=True)), finite

    def _check_agreement(self, what: str, plan: RemovalPlan) -> None:
        if self.sync is None or self.sync.world_size <= 1:
            return
        description = repr([(self.names[id(b)], r) for b, r in plan.blocks] +
                           [(self.names[id(b)], k.tolist()) for b, _, k in plan.units] + [self.state.multiplier])
        gates = gates_of(self.model)
        self.sync.agree(what, digest_tensors([g.theta for g in gates] + [g.locked.to(torch.uint8) for g in gates],
                                             description))

    def active_gates(self) -> list[Gate]:
        return [g for b in self.model.blocks() for g in [b.layer_gate, *b.unit_gates()] if g.active]

    # ------------------------------------------------------------------ surgery
    def apply(self, plan: RemovalPlan, record: bool = True) -> list[PruneEvent]:
        """Carry out `plan` (units first, then blocks); `record=False` replays removals without events."""
        step = self.state.step
        events = [PruneEvent(step, "units", self.names[id(block)], f"-{gate.size - len(keep)} units, {len(keep)} left")
                  for block, gate, keep in plan.units]
        events += [PruneEvent(step, "block", self.names[id(block)], reason) for block, reason in plan.blocks]
        if self.enabled:
            for _, gate, keep in plan.units:
                self.monitor.keep_only(gate, keep)
                self.theta_sgd.keep_only(gate, keep)
            gone = [g for block, _ in plan.blocks for g in (block.layer_gate, *block.unit_gates())]
            self.monitor.forget(gone)
            self.theta_sgd.forget(gone)
        for block, removed in apply_plan(self.model, plan, self.optimizer):
            self.names[id(removed)] = self.names[id(block)]
            self.units_of[id(removed)] = self.units_of[id(block)]
        if not record:
            return []
        self.state.events.extend(events)
        return events

    def shrink_to(self, arch: dict) -> None:
        """Replay the removals that made the architecture `arch` (cap.core.arch) on this pruner's dense model:
        used by resume, so costs, names and step sizes stay those of the dense start."""
        self.apply(removal_plan_for(self.model, arch), record=False)

    # ------------------------------------------------------------------ per epoch
    def structure(self) -> tuple:
        """The deterministic structure: kept units per block, 0 for a block switched off or removed."""
        out = []
        for _, _, block in self.model.block_slots():
            if block.is_removed or block.switched_off():
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
        stable = (self.cfg.harden_patience is not None and self.state.stable_epochs >= self.cfg.harden_patience
                  and self.target_reached() is not False)  # with a target, stable means stable at the target
        # hardening is only meaningful if there is training left for the fixed network
        if (at_deadline or stable) and epoch + 1 < self.epochs:
            return self.harden()
        return []

    def harden(self) -> list[PruneEvent]:
        """Fix the deterministic network: theta < 0.5 removed, the rest set to 1 and ungated."""
        self.state.undecided_at_harden = self.undecided()
        self.state.locked_at_harden = self.locked()
        if self.budget:
            self.state.budget_switched = fit_budget(self.model, self.budget, self.dense, self.monitor.importance())
        plan = deterministic_plan(list(self.model.blocks()))
        self._check_agreement(f"hardening at step {self.state.step}", plan)
        events = self.apply(plan)
        for gate in gates_of(self.model):
            gate.theta.fill_(1.0)
            gate.active = False
        self.state.hardened, self.state.harden_step = True, self.state.step
        set_gate_mode(self.model, "dense")
        return events

    # ------------------------------------------------------------------ checkpointing
    def _gate_names(self) -> dict[Gate, str]:
        return {m: name for name, m in self.model.named_modules() if isinstance(m, Gate)}

    def state_dict(self) -> dict[str, Any]:
        """Everything beyond the model's state_dict (which holds the thetas) that the next steps depend on."""
        names = self._gate_names()
        state = dict(vars(self.state))
        state["events"] = [dict(vars(e)) for e in self.state.events]
        out: dict[str, Any] = {"state": state, "generator": self.generator.get_state(),
                               "skipped_steps": int(self.skipped_steps)}
        if self.enabled:
            m = self.monitor
            out["monitor"] = {"grad_sum": {names[g]: t.clone() for g, t in m.grad_sum.items()},
                              "count": {names[g]: c for g, c in m.counts().items()},
                              "streak": {names[g]: t for g, t in m.streak.items()},
                              "keep_streak": {names[g]: t for g, t in m.keep_streak.items()}}
            out["locked"] = {names[g]: g.locked.clone() for g in self.active_gates()}
            out["theta_mean_sq"] = {names[g]: t for g, t in self.theta_sgd.mean_sq.items()}
        return out

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore after `shrink_to` and model.load_state_dict (the thetas come with the model)."""
        state = dict(saved["state"])
        state["events"] = [PruneEvent(**e) for e in state["events"]]
        self.state = PrunerState(**state)
        self.generator.set_state(saved["generator"])
        self.skipped_steps = torch.tensor(saved["skipped_steps"])
        if self.enabled:
            by_name = {name: g for g, name in self._gate_names().items()}
            m = self.monitor
            # checkpoints load on the CPU; the monitor's sums live where the thetas do
            m.grad_sum = {by_name[n]: t.to(by_name[n].theta.device) for n, t in saved["monitor"]["grad_sum"].items()}
            m.count = {by_name[n]: c for n, c in saved["monitor"]["count"].items()}
            m.streak = {by_name[n]: t.to(by_name[n].theta.device) for n, t in saved["monitor"]["streak"].items()}
            self.theta_sgd.mean_sq = {by_name[n]: t.to(by_name[n].theta.device)
                                      for n, t in saved["theta_mean_sq"].items()}
            m.keep_streak = {by_name[n]: t.to(by_name[n].theta.device)
                             for n, t in saved["monitor"]["keep_streak"].items()}
            for gate in by_name.values():  # the checkpoint alone decides what is locked
                gate.locked = torch.zeros_like(gate.theta, dtype=torch.bool)
            for n, t in saved["locked"].items():
                by_name[n].locked = t.to(by_name[n].theta.device)
        if self.state.hardened:
            for gate in gates_of(self.model):
                gate.active = False
        if self.enabled:
            self.penalty.multiplier = self.state.multiplier

    # ------------------------------------------------------------------ evaluation and reporting
    def deterministic(self) -> None:
        set_gate_mode(self.model, "deterministic")

    def undecided(self, low: float = 0.05, high: float = 0.95) -> int:
        return int(sum(((g.theta > low) & (g.theta < high)).sum() for g in self.active_gates()))

    def locked(self) -> int:
        """Structures the keep rule has locked on (0 after hardening: every gate is then fixed)."""
        return int(sum(g.locked.sum() for g in self.active_gates()))

    def block_structure(self) -> list[dict]:
        """Per block position: kept by the deterministic network?, internal units kept, of how many."""
        out = []
        for _, _, block in self.model.block_slots():
            off = block.is_removed or block.switched_off()
            units = 0 if off else sum(int(deterministic_values(g).sum()) for g in block.unit_gates())
            of = self.units_of[id(block)]
            out.append({"name": self.names[id(block)], "kept": not off, "units": units, "of": of})
        return out

    def theta_summary(self) -> dict[str, dict[str, float] | None]:
        """Per block position: its layer theta, mean unit theta and kept fraction (None once removed)."""
        out: dict[str, dict[str, float] | None] = {}
        for _, _, block in self.model.block_slots():
            if block.is_removed:
                out[self.names[id(block)]] = None
                continue
            units = torch.cat([g.theta for g in block.unit_gates()])
            out[self.names[id(block)]] = {"layer": float(block.layer_gate.theta[0]),
                                          "units_mean": float(units.mean()),
                                          "units_kept_frac": float((units >= KEEP_THETA).float().mean())}
        return out

    def target_reached(self) -> bool | None:
        """Whether the deterministic network is at or below every set target and within BUDGET_TOLERANCE of the
        binding one (None without a target)."""
        if not self.budget:
            return None
        excess = self.budget.excess(expected_cost(self.model, deterministic_values), self.dense)
        return -BUDGET_TOLERANCE - 1e-9 <= excess <= 1e-9

    def stats(self) -> dict:
        final = expected_cost(self.model, deterministic_values)
        structure = self.block_structure()
        return {
            "tau_now": self.cfg.tau * self.state.multiplier,
            "target_macs": self.budget.macs, "target_params": self.budget.params,
            "target_reached": self.target_reached(), "budget_switched": self.state.budget_switched,
            "macs_dense": int(self.dense.macs), "macs_final": int(round(float(final.macs))),
            "params_dense": int(self.dense.params), "params_final": int(round(float(final.params))),
            "mac_ratio": float(final.macs / self.dense.macs),
            "param_ratio": float(final.params / self.dense.params),
            "layers_total": self.layers_total, "layers_kept": sum(b["kept"] for b in structure),
            "units_total": self.units_total, "units_kept": sum(b["units"] for b in structure),
            "theta_undecided": self.undecided(),
            "theta_locked": self.locked(),
            "structure": structure,
        }
