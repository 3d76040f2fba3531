"""The method's settings: the three trade-off parameters and the search's knobs (`prune.*` in a run's config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class PruneConfig:
    tau: float = 0.2
    """accuracy vs pruning, nats per example given up for deleting the whole network; 0 = dense"""
    alpha: float = 0.5
    """1 = only MACs count, 0 = only parameters count"""
    beta: float = 0.5
    """layer vs unit pruning: 1 prunes depth first, 0 width first, 0.5 neutral"""
    target_macs: float | None = None
    """budget target: the final network's MACs as a fraction of the dense network's, in (0, 1]; tau then
    becomes the starting value of a multiplier adjusted during the search (docs/method.md, "Budget targets")"""
    target_params: float | None = None
    """budget target for the parameter count, as target_macs; either one, or both"""
    units: bool = True
    """unit (filter) gates on; False gives layer-only pruning"""
    layers: bool = True
    """layer (residual block) gates on; False gives unit-only pruning"""
    layer_cost: Literal["static", "dynamic"] = "static"
    """layer gates pay the block's dense cost share (static) or its current expected cost (dynamic)"""
    sampling: Literal["example", "batch"] = "example"
    """draw the gates per example (lower-variance estimator) or once per mini-batch"""
    sample_fraction: float = 1.0
    """share of each batch's examples that get sampled gates (with sampling=example); the rest train the
    deterministic network xi = 1[theta >= 0.5], and the estimator uses the drawn share alone"""
    explore: float = 0.05
    """gates are drawn with probability clamp(theta, explore, 1 - explore); the estimator weights are exact"""
    eta: float = 0.0015
    """theta step: a structure of zero importance goes from 1 to 0 in about 1/eta steps"""
    step_norm: Literal["cost", "cost_noise"] = "cost"
    """theta step size eta / scale: scale = the gate's initial cost gradient (cost), or the larger of that
    and the running RMS of its gradient (cost_noise: bounds noisy steps at small tau; docs/method.md)"""
    warmup_epochs: float = 1.0
    """thetas frozen (dense training) for this many epochs"""
    check_every: int = 50
    """steps between pruning checks"""
    theta_min: float = 0.01
    margin: float = 0.2
    patience: int = 2
    """consecutive checks a structure must stay inside the domain of attraction of 0"""
    lock_kept: bool = True
    """the keep rule: a structure with theta >= 0.5 whose importance is above (1 + margin) times its cost
    at `patience` consecutive checks is locked on (theta = 1, xi = 1, no longer sampled or moved)"""
    harden_at: float | None = 0.6
    """fraction of training after which gates are hardened (theta >= 0.5 kept as plain layers,
    the rest removed); None never hardens"""
    harden_patience: int | None = 2
    """harden earlier once the deterministic structure has not changed for this many epochs"""
    bn_batches: int = 20
    """batches used to re-estimate BatchNorm statistics of the deterministic network before evaluation"""
