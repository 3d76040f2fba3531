"""Surgery: force random gates off, remove them physically, and check nothing else changed."""

import pytest
import torch
import torch.nn.functional as F

from cap.core.arch import architecture
from cap.core.complexity import deterministic_values, expected_cost
from cap.core.gates import set_gate_mode
from cap.core.pruner import Pruner
from cap.core.rules import plan_removals
from cap.engine.config import PruneConfig
from cap.models import build_from_architecture, create_model
from tests.prune_utils import random_prune


def _trained_a_little(model, size, channels=3, steps=3):
    """A few SGD steps with momentum so that the optimiser has state to carry, and BN running stats."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(8, channels, size, size)
        loss = F.cross_entropy(model(x), torch.randint(0, model.num_classes, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("resnet56", 32), ("resnet50", 64)])
def test_surgery_preserves_outputs_macs_and_momentum(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, input_size=size)
    opt = _trained_a_little(model, size)
    random_prune(model, block_drop=0.3, unit_drop=0.5)
    model.eval()
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        masked = model(x)
    predicted = expected_cost(model, deterministic_values)

    # momentum of the survivors, read off before surgery through the masks
    survivors = []
    for block in model.blocks():
        if not bool(block.layer_gate.keep_mask()):
            continue
        keeps = [g.keep_mask().nonzero().squeeze(1) for g in block.unit_gates()]
        expected = []
        for j, (conv, _, _) in enumerate(block.stages()):
            buf = opt.state[conv.weight]["momentum_buffer"]
            rows = keeps[j] if j < len(keeps) else torch.arange(buf.shape[0])
            cols = keeps[j - 1] if j > 0 else torch.arange(buf.shape[1])
            expected.append(buf[rows][:, cols].clone())
        survivors.append(([len(k) for k in keeps], expected))

    pruner = Pruner(model, PruneConfig(tau=1.0), steps_per_epoch=1, epochs=1, optimizer=opt)
    pruner.harden()
    set_gate_mode(model, "dense")
    model.eval()
    with torch.no_grad():
        pruned = model(x)
    assert torch.allclose(masked, pruned, atol=1e-5), (masked - pruned).abs().max()
    after = expected_cost(model)
    assert float(after.macs) == pytest.approx(float(predicted.macs))
    assert float(after.params) == pytest.approx(float(predicted.params))

    kept_blocks = list(model.blocks())
    assert len(kept_blocks) == len(survivors)
    for block, (widths, expected) in zip(kept_blocks, survivors, strict=True):
        assert [g.size for g in block.unit_gates()] == widths
        for (conv, _, _), buf in zip(block.stages(), expected, strict=True):
            assert torch.equal(opt.state[conv.weight]["momentum_buffer"], buf)
    # the optimiser holds exactly the model's parameters, so training continues on the smaller network
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.parameters()}
    _trained_a_little(model, size, steps=1)


def test_architecture_round_trip_loads_the_shrunken_state_dict():
    torch.manual_seed(1)
    model = create_model("resnet20", num_classes=10)
    random_prune(model, block_drop=0.4, unit_drop=0.6)
    Pruner(model, PruneConfig(tau=1.0), 1, 1).harden()
    spec = architecture(model, "resnet20", {"num_classes": 10})
    rebuilt = build_from_architecture(spec)
    rebuilt.load_state_dict(model.state_dict())
    model.eval()
    rebuilt.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert sum(e["removed"] for e in spec["blocks"]) >= 1


def test_a_unit_gate_emptied_removes_the_block_instead():
    model = create_model("resnet20")
    block = next(model.blocks())
    remove = {block.gate1: torch.ones(block.gate1.size, dtype=torch.bool)}
    plan = plan_removals(list(model.blocks()), remove)
    assert plan.blocks == [(block, "all units pruned")] and plan.units == []


def test_removed_block_stops_costing_compute():
    torch.manual_seed(2)
    model = create_model("resnet20")
    before = expected_cost(model)
    block = next(model.blocks())
    pruner = Pruner(model, PruneConfig(tau=1.0), 1, 1)
    pruner.apply(plan_removals(list(model.blocks()), {block.layer_gate: torch.ones(1, dtype=torch.bool)}))
    after = expected_cost(model)
    assert sum(1 for _ in model.blocks()) == 8
    assert float(before.macs - after.macs) == pytest.approx(16 * 16 * 9 * 32 * 32 * 2)
    assert all(p is not q for p in model.parameters() for q in block.parameters())
