"""The pruning term of the objective and the projected theta step.

    C(W, theta) = E_{xi ~ Bern(theta)}[CE] + (wd / 2)||W||^2 + R(theta)
    R(theta)    = tau * [alpha * F(theta) / F_0 + (1 - alpha) * P(theta) / P_0]

gamma_s = dR/dtheta_s is the per-structure regularisation, selected automatically. Unit gates use
it as it is (dynamic: a unit next to pruned neighbours costs less). Layer gates use the block's
share of the DENSE network's complexity, fixed at the start ("static", the default), because a
dynamic layer cost falls as the block's units die and starves layer pruning. The balance beta
scales the layer gates' penalty by 2*beta and the unit gates' by 2*(1 - beta).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from cap.core.blocks import GatedNet
from cap.core.complexity import branch_cost, expected_cost, ones_values, unit_slopes
from cap.core.gates import Gate


class ComplexityPenalty:
    """R(theta) and the weighted per-gate costs w_kind * gamma_s."""

    def __init__(self, model: GatedNet, tau: float, alpha: float, beta: float,
                 layer_cost: Literal["static", "dynamic"] = "static") -> None:
        self.model, self.tau, self.alpha = model, tau, alpha
        self.weight = {"layer": 2.0 * beta, "unit": 2.0 * (1.0 - beta)}
        self.layer_cost = layer_cost
        dense = expected_cost(model, ones_values)
        self.F0, self.P0 = float(dense.macs), float(dense.params)
        self.static_layer_gamma = {
            block.layer_gate: self._normalise(branch_cost(block, ones_values)) for block in model.blocks()
        }
        # gamma at initialisation (all thetas 1), unweighted: sets each gate's step size
        self.gamma0 = {g: float(v.mean()) for g, v in self._raw_gammas().items()}
        self.multiplier = 1.0  # tau_now / tau: moved by a budget target (cap.core.budget), else 1

    def _normalise(self, cost) -> Tensor:
        return self.tau * (self.alpha * cost.macs / self.F0 + (1 - self.alpha) * cost.params / self.P0)

    def value(self) -> Tensor:
        return self.multiplier * self._normalise(expected_cost(self.model))

    def _raw_gammas(self) -> dict[Gate, Tensor]:
        """dR/dtheta_s (unweighted) for every active gate, in closed form (cap.core.complexity.unit_slopes): the
        per-step penalty adds no autograd graph and no host read."""
        out: dict[Gate, Tensor] = {}
        for block in self.model.blocks():
            units = [g for g in block.unit_gates() if g.active]
            slopes = unit_slopes(block) if units else {}
            for gate in units:
                out[gate] = self._normalise(slopes[gate]).to(gate.theta.dtype).expand_as(gate.theta)
            layer = block.layer_gate
            if layer.active and self.layer_cost == "static":
                out[layer] = self.static_layer_gamma[layer].reshape(1)  # float64, as the dense costs
            elif layer.active:  # dynamic: the branch's expected cost, which is affine in its layer theta
                whole = branch_cost(block, lambda g, layer=layer: torch.ones_like(g.theta) if g is layer else g.theta)
                out[layer] = self._normalise(whole).to(layer.theta.dtype).reshape(1)
        return out

    def gammas(self) -> dict[Gate, Tensor]:
        """w_kind(s) * gamma_s for every active gate, at the current multiplier."""
        return {g: self.multiplier * self.weight[g.kind] * v for g, v in self._raw_gammas().items()}


class ThetaSGD:
    """theta_s <- clip(theta_s - lr_s * (g_s + w gamma_s), 0, 1) with lr_s = eta / scale_s.

    step_norm="cost": scale_s = gamma_s(init). A per-gate step: a layer gate's gamma is 16-64x a unit's,
    so one plain step size cannot serve both kinds. A structure of zero importance reaches 0 in
    ~1/(eta*w) steps. But the gradient noise is divided by gamma too, and gamma is proportional to
    tau: at small tau a noisy estimate throws thetas across [0, 1] in a few steps (docs/method.md).
    step_norm="cost_noise": scale_s = max(gamma_s(init), rms_s), rms_s a running root mean square of
    the gate's own gradient (per unit). Where the cost dominates nothing changes; where noise
    dominates, one step moves a theta by about eta at most, and the cost's pull is eta * gamma/rms.
    No momentum, no weight decay: the cost stays affine in each theta.
    """

    RMS_DECAY = 0.98
    """about a 50-step window"""

    def __init__(self, gamma0: dict[Gate, float], eta: float, step_norm: str = "cost") -> None:
        self.gamma0, self.eta, self.step_norm = gamma0, eta, step_norm
        self.mean_sq: dict[Gate, Tensor] = {}

    @torch.no_grad()
    def step(self, grads: dict[Gate, Tensor], gammas: dict[Gate, Tensor], finite: Tensor | None = None) -> None:
        """One step for every gate in `grads`. `finite` (a 0-d bool tensor, None = True) skips the step on the
        device, without a host read: the thetas and the RMS stay as they are."""
        gates = list(grads)
        if not gates:
            return
        scales: list = [max(self.gamma0[gate], 1e-12) for gate in gates]
        if self.step_norm == "cost_noise":
            scales = [self._noise_scale(gate, grads[gate], scale, finite)
                      for gate, scale in zip(gates, scales, strict=True)]
        # one multi-tensor operation per term for all gates, not a chain of small ones per gate
        update = torch._foreach_add([grads[gate] for gate in gates], [gammas[gate] for gate in gates])
        torch._foreach_mul_(update, self.eta)
        torch._foreach_div_(update, scales)
        if finite is not None:
            torch._foreach_mul_(update, finite.to(torch.float32))
        thetas = [gate.theta for gate in gates]
        torch._foreach_sub_(thetas, update)
        torch._foreach_clamp_min_(thetas, 0.0)
        torch._foreach_clamp_max_(thetas, 1.0)

    def _noise_scale(self, gate: Gate, g: Tensor, scale: float, finite: Tensor | None) -> Tensor:
        sq = self.mean_sq.get(gate)
        new = g * g if sq is None else self.RMS_DECAY * sq + (1 - self.RMS_DECAY) * g * g
        self.mean_sq[gate] = new if finite is None or sq is None else torch.where(finite, new, sq)
        return torch.clamp(self.mean_sq[gate].sqrt(), min=scale)

    def keep_only(self, gate: Gate, keep: Tensor) -> None:
        if gate in self.mean_sq:
            self.mean_sq[gate] = self.mean_sq[gate][keep]

    def forget(self, gates: list[Gate]) -> None:
        for gate in gates:
            self.mean_sq.pop(gate, None)
