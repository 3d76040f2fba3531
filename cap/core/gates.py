"""Variational Bernoulli gates.

A `Gate` scales `size` structures (the channels of a tensor, or a whole residual branch when
size == 1) by binary variables xi_s ~ Bern(theta_s). theta lives directly in [0, 1] as a buffer;
it is moved by the projected theta step (cap.core.objective), never by the weight optimiser.

Modes:
  dense          xi = 1, the gate is the identity (warm-up, hardened, or tau = 0);
  sample         xi drawn per example (or per batch) with P(xi_s = 1) = clamp(theta_s, e, 1 - e),
                 or 1 for a structure the keep rule has locked on; with sample_fraction < 1 only the
                 batch's first share of examples is drawn and the rest see the deterministic gates;
                 xi requires grad so that backward yields dL/dxi at the sample;
  deterministic  xi = 1[theta >= 0.5] (evaluation and export).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

GateMode = Literal["dense", "sample", "deterministic"]

KEEP_THETA = 0.5
"""the deterministic network keeps a structure when theta >= KEEP_THETA: xi = 1[theta >= 0.5]"""


class Gate(nn.Module):
    """Bernoulli gates over `size` structures of one kind ("unit" or "layer")."""

    def __init__(self, size: int, kind: Literal["unit", "layer"]) -> None:
        super().__init__()
        self.kind = kind
        self.register_buffer("theta", torch.ones(size))
        # Locked on (the pruner's keep rule): no longer sampled or moved, xi = 1. Not persistent: the
        # pruner's own state carries it, so model state_dicts stay the same with or without the rule.
        self.register_buffer("locked", torch.zeros(size, dtype=torch.bool), persistent=False)
        self.mode: GateMode = "dense"
        self.active = True  # False: frozen at theta = 1 (an ablation switched this kind off)
        self.explore = 0.05
        self.per_example = True
        self.sample_fraction = 1.0  # share of a batch's examples drawn; the rest see the deterministic gates
        # Shared gate RNG: under data parallelism every rank holds the same generator and draws the
        # gates of the whole global batch, keeping its own slice (rank, world_size); the ranks then
        # train one consistent sample of networks and their generators never drift apart.
        self.generator: torch.Generator | None = None
        self.shard: tuple[int, int] = (0, 1)
        self.xi: Tensor | None = None
        self.p_on: Tensor | None = None
        self.drawn_rows = 0

    @property
    def size(self) -> int:
        return self.theta.numel()

    def keep_mask(self) -> Tensor:
        """The deterministic network's choice: xi = 1[theta >= 0.5]."""
        return self.theta >= KEEP_THETA

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "dense" or not self.active:
            return x
        if self.mode == "deterministic":
            return x * self._broadcast(self.keep_mask().to(x.dtype), x)
        # Sampling from the clamped probability keeps both outcomes observable at theta in {0, 1},
        # so the reweighted estimator below stays exact there (no pull-down of kept gates).
        # x: (B, C, H, W) for a unit gate (C = size), or a branch output (B, C, H, W) for a layer gate (size 1)
        p_on = self.theta.clamp(self.explore, 1.0 - self.explore).masked_fill(self.locked, 1.0)  # (size,)
        rank, world = self.shard
        rows = x.shape[0] if self.per_example else 1
        draws = torch.bernoulli(p_on.expand(rows * world if self.per_example else 1, self.size),
                                generator=self.generator)  # (B * world, size) per example, else (1, size)
        if self.per_example and world > 1:
            draws = draws[rank * rows:(rank + 1) * rows]  # (B, size): this rank's slice of the global batch
        self.drawn_rows = draws.shape[0]
        if self.per_example and self.sample_fraction < 1.0:
            # the rest of the batch trains the network the search points to, free of gate noise
            self.drawn_rows = max(1, math.ceil(self.sample_fraction * rows))
            kept = (self.keep_mask() | self.locked).to(draws.dtype)
            draws = torch.cat([draws[:self.drawn_rows], kept.expand(rows - self.drawn_rows, self.size)])
        # xi stays float32 under autocast so that dL/dxi, the estimator's input, keeps full precision
        xi = draws.requires_grad_(True)
        self.xi, self.p_on = xi, p_on
        return x * self._broadcast(xi, x).to(x.dtype)

    def _broadcast(self, xi: Tensor, x: Tensor) -> Tensor:
        """xi (rows, size) or (size,) -> (rows, C, 1, 1) for x (B, C, H, W): C = size for units, 1 for a block."""
        rows = xi.shape[0] if xi.dim() == 2 else 1
        channels = self.size if self.kind == "unit" else 1
        return xi.reshape(rows, channels, *([1] * (x.dim() - 2)))

    def trapezoid_grad(self) -> Tensor | None:
        """g_s = sum_n dL/dxi_ns / (2 P(xi_ns)). Its mean is (dL/dxi|0 + dL/dxi|1) / 2 for any theta.

        The loss is a batch mean, so summing the per-example terms gives the batch-mean estimate; with
        sample_fraction < 1 the sum runs over the drawn rows and is scaled up to the whole batch.
        Returns None when no sample was drawn (dense mode) or no gradient reached the gate.
        """
        if self.xi is None or self.xi.grad is None:
            return None
        drawn = self.xi.detach()[:self.drawn_rows]
        p_sample = torch.where(drawn > 0.5, self.p_on, 1.0 - self.p_on)
        estimate = (self.xi.grad[:self.drawn_rows] / (2.0 * p_sample)).sum(0)
        return estimate if self.drawn_rows == self.xi.shape[0] else estimate * (self.xi.shape[0] / self.drawn_rows)

    def clear(self) -> None:
        self.xi = None
        self.p_on = None

    def extra_repr(self) -> str:
        return f"kind={self.kind}, size={self.size}, mode={self.mode}"


def set_gate_mode(model: nn.Module, mode: GateMode) -> None:
    for gate in gates_of(model):
        gate.mode = mode
        gate.clear()


def gates_of(model: nn.Module) -> list[Gate]:
    return [m for m in model.modules() if isinstance(m, Gate)]
