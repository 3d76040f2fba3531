"""What a sampling step costs the pruner: closed-form gammas, no host reads, a bounded number of operators."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from cap.core.complexity import expected_cost
from cap.core.config import PruneConfig
from cap.core.gates import gates_of
from cap.core.objective import ComplexityPenalty, ThetaSGD
from cap.models import create_model

_SPEC = importlib.util.spec_from_file_location("bench_step", Path(__file__).resolve().parents[1] / "tools" /
                                               "bench_step.py")
bench_step = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_step)

PRUNER_OPS_RESNET56 = 1250
"""aten operators the pruner (before_forward + after_step) dispatches per sampling step of ResNet-56 (54 gates):
2957 with gammas by autograd, 1394 with them in closed form, 1132 with the multi-tensor theta step and sums
(per-gate draws and estimator remain);
a bound, so that per-gate work cannot grow unnoticed"""


def _autograd_gammas(penalty: ComplexityPenalty) -> dict:
    gates = [g for g in gates_of(penalty.model) if g.active]
    leaves = {g: g.theta.detach().clone().requires_grad_(True) for g in gates}
    cost = penalty._normalise(expected_cost(penalty.model, lambda g: leaves.get(g, g.theta)))
    grads = torch.autograd.grad(cost, list(leaves.values()), allow_unused=True)
    return {g: torch.zeros_like(g.theta) if d is None else d for g, d in zip(gates, grads, strict=True)}


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "resnet50"])
def test_closed_form_gammas_equal_the_autograd_gradient_of_the_cost(name):
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, input_size=64 if name == "resnet50" else 32)
    for gate in gates_of(model):
        gate.theta.copy_(torch.rand(gate.size))
    blocks = list(model.blocks())
    blocks[1].unit_gates()[0].theta.zero_()  # an empty internal layer: the block costs 0, so do its slopes
    blocks[2].unit_gates()[0].active = False  # an inactive gate counts at its theta and gets no gamma
    penalty = ComplexityPenalty(model, tau=0.6, alpha=0.3, beta=0.5, layer_cost="dynamic")
    closed, reference = penalty._raw_gammas(), _autograd_gammas(penalty)
    assert set(closed) == set(reference)
    for gate, value in closed.items():
        assert value.shape == gate.theta.shape
        torch.testing.assert_close(value.float(), reference[gate].float(), rtol=1e-6, atol=0)
    assert float(closed[blocks[1].unit_gates()[-1]].abs().max()) == 0


def test_a_sampling_step_reads_nothing_on_the_host_and_dispatches_a_bounded_number_of_operators():
    cfg = PruneConfig(tau=0.6, warmup_epochs=0, check_every=10**9, harden_at=None)
    bench = bench_step.Bench("resnet56", batch=2, size=8, cfg=cfg)
    bench.step(gated=True)
    step = bench_step.count_ops(lambda: bench.step(gated=True))
    assert step[bench_step.HOST_READ] == 0, "a per-step host read (bool/float/item of a tensor) is back"
    ops = bench_step.pruner_ops(bench)
    assert sum(ops.values()) <= PRUNER_OPS_RESNET56, ops.most_common(8)


def _per_gate_reference_step(sgd: ThetaSGD, grads: dict, gammas: dict, finite, mean_sq: dict) -> dict:
    """The theta step written one gate at a time, as the formula reads: the multi-tensor step must equal it."""
    go = finite.to(torch.float32)
    out = {}
    for gate, g in grads.items():
        scale = max(sgd.gamma0[gate], 1e-12)
        if sgd.step_norm == "cost_noise":
            sq = mean_sq.get(gate)
            new = g * g if sq is None else sgd.RMS_DECAY * sq + (1 - sgd.RMS_DECAY) * g * g
            mean_sq[gate] = new if sq is None else torch.where(finite, new, sq)
            scale = torch.clamp(mean_sq[gate].sqrt(), min=scale)
        out[gate] = gate.theta.clone().sub_(sgd.eta * (g + gammas[gate]) / scale * go).clamp_(0.0, 1.0)
    return out


@pytest.mark.parametrize("step_norm", ["cost", "cost_noise"])
def test_the_multi_tensor_theta_step_equals_the_per_gate_formula_bit_for_bit(step_norm):
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, input_size=28)
    for gate in gates_of(model):
        gate.theta.copy_(torch.rand(gate.size))
    penalty = ComplexityPenalty(model, tau=0.6, alpha=0.5, beta=0.5)
    sgd = ThetaSGD(penalty.gamma0, eta=0.3, step_norm=step_norm)  # a large step, so clamping happens too
    reference_sq: dict = {}
    for finite in (True, True, False, True):
        grads = {g: torch.randn(g.size) for g in gates_of(model)}
        gammas = penalty.gammas()
        finite = torch.tensor(finite)
        expected = _per_gate_reference_step(sgd, grads, gammas, finite, reference_sq)
        sgd.step(grads, gammas, finite)
        for gate, theta in expected.items():
            assert torch.equal(gate.theta, theta), gate
    assert any(float(g.theta.min()) == 0.0 for g in gates_of(model))


def test_a_non_finite_step_is_skipped_on_the_device_and_counted():
    cfg = PruneConfig(tau=0.6, warmup_epochs=0, check_every=10**9, harden_at=None)
    bench = bench_step.Bench("resnet20", batch=2, size=8, cfg=cfg)
    pruner = bench.pruner
    before = [g.theta.clone() for g in pruner.active_gates()]
    pruner.before_forward()
    torch.nn.functional.cross_entropy(bench.model(bench.x), bench.y).backward()
    pruner.active_gates()[0].xi.grad[0, 0] = float("inf")  # what an overflowing fp16 step leaves
    pruner.after_step()
    assert all(torch.equal(b, g.theta) for b, g in zip(before, pruner.active_gates(), strict=True))
    assert int(pruner.skipped_steps) == 1
    assert set(pruner.monitor.counts().values()) == {0}  # the window holds no finite step
    assert pruner.state_dict()["skipped_steps"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_sampling_step_does_not_synchronise_the_gpu():
    cfg = PruneConfig(tau=0.6, warmup_epochs=0, check_every=10**9, harden_at=None)
    bench = bench_step.Bench("resnet56", batch=8, size=32, cfg=cfg, device="cuda")
    bench.step(gated=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bench.pruner.before_forward()
        torch.nn.functional.cross_entropy(bench.model(bench.x), bench.y).backward()
        bench.pruner.after_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
