"""The theta step: eta / initial cost gradient (cost), and the noise-bounded variant (cost_noise)."""

from __future__ import annotations

import torch

from cap.core.gates import Gate
from cap.core.objective import ThetaSGD


def _walk(step_norm: str, gamma: float, noise: float, steps: int, seed: int = 0) -> torch.Tensor:
    """Thetas of 200 zero-importance units under noisy gradients: mean 0, spread `noise`."""
    gate = Gate(200, "unit")
    sgd = ThetaSGD({gate: gamma}, eta=0.02, step_norm=step_norm)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        sgd.step({gate: noise * torch.randn(200, generator=gen)}, {gate: torch.full((200,), gamma)})
    return gate.theta


def test_cost_step_moves_a_zero_importance_unit_to_zero_in_one_over_eta_steps():
    for step_norm in ("cost", "cost_noise"):  # without noise both are the same rule
        theta = _walk(step_norm, gamma=1e-3, noise=0.0, steps=49)
        assert torch.allclose(theta, torch.full_like(theta, 0.02), atol=1e-6), step_norm
        assert bool((_walk(step_norm, gamma=1e-3, noise=0.0, steps=51) == 0).all())  # float32 rounding: 50 + 1


def test_noise_bounded_step_keeps_noise_from_deciding_at_small_cost():
    # gradient noise 100x the cost gradient (a small tau): the cost step flings thetas to 0 within 10 steps,
    # the noise-bounded step moves each theta by about eta per step at most
    flung = _walk("cost", gamma=1e-4, noise=1e-2, steps=10)
    bounded = _walk("cost_noise", gamma=1e-4, noise=1e-2, steps=10)
    assert (flung == 0).float().mean() > 0.3
    assert (bounded == 0).sum() == 0 and bounded.min() > 0.5
    # the cost still pulls: drift down in expectation, slowly
    assert _walk("cost_noise", gamma=1e-4, noise=1e-2, steps=400).mean() < 1.0


def test_noise_state_follows_surgery():
    gate = Gate(4, "unit")
    sgd = ThetaSGD({gate: 1.0}, eta=0.1, step_norm="cost_noise")
    sgd.step({gate: torch.tensor([1.0, 2.0, 3.0, 4.0])}, {gate: torch.zeros(4)})
    sgd.keep_only(gate, torch.tensor([1, 3]))
    assert torch.equal(sgd.mean_sq[gate], torch.tensor([4.0, 16.0]))
    sgd.forget([gate])
    assert gate not in sgd.mean_sq
