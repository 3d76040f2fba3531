"""Complexity accounting: MACs and parameters as exact functions of the gate parameters.

Convention (stated once, used everywhere):
  MACs   multiply-accumulates of conv and linear layers; BN, ReLU, additions and pooling are not
         counted. torch.utils.flop_counter reports FLOPs = 2 * MACs for the same layers.
  params trainable parameters: conv/linear weights and biases and BN affine scale and shift
         (running statistics are buffers, not parameters).

With every gate replaced by its theta, a conv between gated inputs i and gated outputs j inside
block b costs theta_b * (sum_i theta_i) * (sum_j theta_j) * k*k*H*W. Each term is a product of
distinct independent gates, so this equals the EXPECTED complexity under xi ~ Bern(theta) and is
affine in every single theta_s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cap.core.blocks import GatedNet
from cap.core.gates import Gate

ThetaOf = Callable[[Gate], Tensor]


@dataclass
class Complexity:
    macs: Tensor
    params: Tensor


def theta_values(gate: Gate) -> Tensor:
    return gate.theta


def deterministic_values(gate: Gate) -> Tensor:
    """xi = 1[theta >= 0.5] where the gate is in use; an inactive gate always passes."""
    return gate.keep_mask().to(gate.theta.dtype) if gate.active else torch.ones_like(gate.theta)


def ones_values(gate: Gate) -> Tensor:
    return torch.ones_like(gate.theta)


def _conv_macs_params(conv: nn.Conv2d, cin, cout) -> tuple:
    k = conv.kernel_size[0] * conv.kernel_size[1] / conv.groups
    params = cin * cout * k + (cout if conv.bias is not None else 0)
    return cin * cout * k * conv.out_hw, params


def branch_cost(block: nn.Module, theta_of: ThetaOf = theta_values) -> Complexity:
    """Expected MACs/params of a gated block's branch, including its layer gate."""
    macs, params = 0.0, 0.0
    width_in = block.conv1.in_channels
    for conv, _bn, gate in block.stages():
        # float64: costs reach 1e9-1e10 MACs, where float32 no longer counts single units
        width_out = theta_of(gate).sum().double() if gate is not None else conv.out_channels
        m, p = _conv_macs_params(conv, width_in, width_out)
        macs, params = macs + m, params + p + 2 * width_out  # + BN scale and shift
        width_in = width_out
    layer = theta_of(block.layer_gate).sum().double()
    # an internal layer without a unit: the block is removed whole (pruning.plan_removals), so it costs 0
    # (a tensor product rather than an `if`: no device sync in the per-step penalty)
    for _, _, gate in block.stages():
        if gate is not None:
            layer = layer * (theta_of(gate).amax() > 0).double()
    return Complexity(torch.as_tensor(layer * macs), torch.as_tensor(layer * params))


def unit_slopes(block: nn.Module, theta_of: ThetaOf = theta_values) -> dict[Gate, Complexity]:
    """d branch_cost / d theta_s for every unit gate of `block`, in closed form (no autograd): the cost depends
    on a gate's thetas only through their sum, so every unit of a gate has the same slope (0-d tensors).

    Unit s of stage k widens conv k's output, its BN, and conv k+1's input:
        slope_k = theta_B * alive * (c(conv_k; W_{k-1} -> 1) + 2 BN params + c(conv_{k+1}; 1 -> W_{k+1}))
    with W the expected widths and c the (affine) cost of one more channel. `alive` is branch_cost's
    step term (0 once an internal layer is empty); like the step itself it has no slope."""
    stages = block.stages()
    widths = [block.conv1.in_channels] + [theta_of(g).sum().double() if g is not None else conv.out_channels
                                          for conv, _, g in stages]
    scale = theta_of(block.layer_gate).sum().double()
    for _, _, gate in stages:
        if gate is not None:
            scale = scale * (theta_of(gate).amax() > 0).double()
    out = {}
    for k, (conv, _bn, gate) in enumerate(stages):
        if gate is None:
            continue
        nxt = stages[k + 1][0]
        m_out, p_out = _one_more_channel(conv, widths[k], 0, as_input=False)
        m_in, p_in = _one_more_channel(nxt, 0, widths[k + 2], as_input=True)
        out[gate] = Complexity(scale * (m_out + m_in), scale * (p_out + 2 + p_in))
    return out


def _one_more_channel(conv: nn.Conv2d, cin, cout, as_input: bool) -> tuple:
    """(MACs, params) that one more input (or output) channel adds to `conv` at widths (cin, cout): the cost is
    affine in each width, so the difference is exact."""
    base = _conv_macs_params(conv, cin, cout)
    more = _conv_macs_params(conv, cin + 1, cout) if as_input else _conv_macs_params(conv, cin, cout + 1)
    return more[0] - base[0], more[1] - base[1]


def _module_cost(module: nn.Module) -> tuple[float, float]:
    if isinstance(module, nn.Conv2d):
        return _conv_macs_params(module, module.in_channels, module.out_channels)
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features, sum(p.numel() for p in module.parameters())
    if isinstance(module, nn.BatchNorm2d):
        return 0.0, sum(p.numel() for p in module.parameters())
    return 0.0, 0.0


def static_cost(model: GatedNet) -> Complexity:
    """Everything not inside a live gated branch: stem, classifier, shortcuts."""
    in_branches = {id(m) for block in model.blocks() for conv, bn, _ in block.stages() for m in (conv, bn)}
    macs = params = 0.0
    for module in model.modules():
        if id(module) not in in_branches:
            m, p = _module_cost(module)
            macs, params = macs + m, params + p
    return Complexity(torch.tensor(float(macs), dtype=torch.float64), torch.tensor(float(params), dtype=torch.float64))


def expected_cost(model: GatedNet, theta_of: ThetaOf = theta_values) -> Complexity:
    """MACs and params of `model` with every gate replaced by `theta_of(gate)` (differentiable)."""
    total = static_cost(model)
    macs, params = total.macs, total.params
    for block in model.blocks():
        c = branch_cost(block, theta_of)
        macs, params = macs + c.macs, params + c.params
    return Complexity(macs, params)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
