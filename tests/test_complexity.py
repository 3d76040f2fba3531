"""MAC and parameter counts: reference sizes, an independent counter, dense and randomly pruned."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cap.core.complexity import count_params, deterministic_values, expected_cost
from cap.core.gates import set_gate_mode
from cap.models import create_model
from tests.prune_utils import random_prune

# method-notes reference sizes (10 classes, 3 input channels, option-A shortcuts)
REFERENCE = {"resnet20": (0.270e6, 40.55e6), "resnet32": (0.464e6, 68.86e6),
             "resnet56": (0.853e6, 125.49e6), "resnet110": (1.728e6, 252.89e6)}


def independent_macs(model, input_size, in_channels=3) -> int:
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, in_channels, input_size, input_size))
    return counter.get_total_flops() // 2  # FlopCounterMode counts 2 FLOPs per MAC


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_cifar_resnets_match_reference_sizes(name):
    model = create_model(name)
    cost = expected_cost(model)
    params, macs = REFERENCE[name]
    assert float(cost.params) == pytest.approx(params, rel=2e-3)
    assert float(cost.macs) == pytest.approx(macs, rel=2e-3)
    assert int(cost.params) == count_params(model)
    assert int(cost.macs) == independent_macs(model, 32)


def test_resnet50_matches_torchvision_and_flop_counter():
    torchvision = pytest.importorskip("torchvision")
    model = create_model("resnet50", num_classes=1000)
    cost = expected_cost(model)
    reference = torchvision.models.resnet50()
    assert int(cost.params) == count_params(reference) == 25_557_032
    assert int(cost.macs) == independent_macs(model, 224) == independent_macs(reference, 224)


@pytest.mark.parametrize("name,size,classes", [("resnet20", 32, 10), ("resnet56", 32, 10),
                                               ("resnet18", 64, 100), ("resnet50", 64, 100)])
def test_randomly_pruned_counts_match_independent_counter(name, size, classes):
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, input_size=size)
    random_prune(model, block_drop=0.3, unit_drop=0.5)
    # prediction from the masked network (thetas 0/1), before any surgery ...
    predicted = expected_cost(model, deterministic_values)
    # ... and the physically pruned network counted by torch itself
    from cap.core.pruner import Pruner
    from cap.engine.config import PruneConfig

    Pruner(model, PruneConfig(tau=1.0), steps_per_epoch=1, epochs=1).harden()
    set_gate_mode(model, "dense")
    assert int(round(float(predicted.params))) == count_params(model)
    assert int(round(float(predicted.macs))) == independent_macs(model, size)
    assert count_params(model) < count_params(create_model(name, num_classes=classes, input_size=size))


def test_expected_cost_is_the_expectation_over_gate_samples():
    """F(theta) with thetas substituted equals the mean MACs of networks sampled from Bern(theta)."""
    torch.manual_seed(1)
    model = create_model("resnet20")
    for block in model.blocks():
        for gate in [block.layer_gate, *block.unit_gates()]:
            gate.theta.uniform_(0.2, 1.0)
    expected = float(expected_cost(model).macs)
    draws = []
    for _ in range(400):
        sample = {g: torch.bernoulli(g.theta) for b in model.blocks() for g in [b.layer_gate, *b.unit_gates()]}
        draws.append(float(expected_cost(model, sample.__getitem__).macs))
    mean = sum(draws) / len(draws)
    stderr = torch.tensor(draws).std().item() / len(draws) ** 0.5
    assert abs(mean - expected) < 4 * stderr
