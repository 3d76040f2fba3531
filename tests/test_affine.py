"""The cost is affine in every single theta_s: data term (by enumeration) and penalty (exactly)."""

import pytest
import torch

from cap.core.objective import ComplexityPenalty
from cap.models import create_model
from tests.tiny import TinyNet, config_weight, enumerate_configs, loss_and_grad_at


def test_expected_data_term_is_affine_in_each_theta():
    torch.manual_seed(0)
    net = TinyNet()
    net.train()
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    table = [(c, loss_and_grad_at(net, c, x, y)[0]) for c in enumerate_configs(4)]
    theta = torch.tensor([0.3, 0.8, 0.6, 0.5])

    def expected_loss(t):
        return sum(config_weight(c, t) * loss for c, loss in table)

    for s in range(4):
        at = {}
        for v in (0.0, 0.37, 1.0):
            t = theta.clone()
            t[s] = v
            at[v] = expected_loss(t)
        assert at[0.37] == pytest.approx(0.63 * at[0.0] + 0.37 * at[1.0], abs=1e-6)


@pytest.mark.parametrize("layer_cost", ["static", "dynamic"])
def test_penalty_is_affine_in_each_theta_and_gamma_is_its_slope(layer_cost):
    torch.manual_seed(1)
    model = create_model("resnet20")
    penalty = ComplexityPenalty(model, tau=0.7, alpha=0.3, beta=0.5, layer_cost=layer_cost)
    gates = [g for b in model.blocks() for g in [b.layer_gate, *b.unit_gates()]]
    for g in gates:
        g.theta.uniform_(0.1, 0.9)
    gammas = penalty.gammas()  # beta = 0.5: both weights are 1
    for gate in gates[::4]:
        index = int(torch.randint(gate.size, ()))
        saved = float(gate.theta[index])
        values = {}
        for v in (0.0, 0.37, 1.0):
            gate.theta[index] = v
            values[v] = float(penalty.value())
        gate.theta[index] = saved
        assert values[0.37] == pytest.approx(0.63 * values[0.0] + 0.37 * values[1.0], rel=1e-5)
        slope = values[1.0] - values[0.0]
        if gate.kind == "unit" or layer_cost == "dynamic":
            assert float(gammas[gate][index]) == pytest.approx(slope, rel=1e-4)
        else:  # static: the block's share of the DENSE network, whatever its units do now
            assert float(gammas[gate]) > slope


def test_beta_weights_the_two_kinds():
    model = create_model("resnet20")
    layer = next(model.blocks()).layer_gate
    unit = next(model.blocks()).gate1
    g = {beta: ComplexityPenalty(model, 1.0, 0.5, beta).gammas() for beta in (0.2, 0.5, 0.8)}
    assert float(g[0.8][layer]) == pytest.approx(4 * float(g[0.2][layer]))
    assert float(g[0.2][unit][0]) == pytest.approx(4 * float(g[0.8][unit][0]))
    neutral = ComplexityPenalty(model, 1.0, 0.5, 0.5)
    assert float(g[0.5][layer]) == pytest.approx(float(neutral.static_layer_gamma[layer]))
