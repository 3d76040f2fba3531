"""Mixed precision and the other GPU-minded options: the theta step is immune to the loss scale, a step the
scaler skips leaves the thetas alone, and a bf16 + channels_last + clipped run trains and prunes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from cap.core.gates import gates_of
from cap.engine.config import PruneConfig, load_config
from cap.engine.run import run
from cap.models import create_model


def _pruner_and_batch():
    from cap.core.pruner import Pruner

    torch.manual_seed(0)
    model = create_model("resnet20", width=4, num_classes=3, in_channels=1, input_size=8)
    pruner = Pruner(model, PruneConfig(tau=1.0, warmup_epochs=0, eta=0.05), steps_per_epoch=10, epochs=1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    return model, pruner, x, y


def _one_step(model, pruner, x, y, scale: float) -> torch.Tensor:
    pruner.generator.manual_seed(1)  # the same gate draws for both scales
    pruner.before_forward()
    (F.cross_entropy(model(x), y) * scale).backward()
    pruner.after_step(grad_scale=scale)
    return torch.cat([g.theta for g in gates_of(model)])


def test_theta_step_divides_out_the_loss_scale():
    model, pruner, x, y = _pruner_and_batch()
    twin, twin_pruner = copy.deepcopy(model), None
    from cap.core.pruner import Pruner

    twin_pruner = Pruner(twin, pruner.cfg, steps_per_epoch=10, epochs=1)
    plain = _one_step(model, pruner, x, y, 1.0)
    scaled = _one_step(twin, twin_pruner, x, y, 2.0**12)
    assert float((plain - 1).abs().max()) > 1e-4, "the step must move the thetas"
    torch.testing.assert_close(scaled, plain, rtol=0, atol=1e-6)


def test_a_step_with_non_finite_gate_gradients_leaves_thetas_alone():
    model, pruner, x, y = _pruner_and_batch()
    before = torch.cat([g.theta for g in gates_of(model)]).clone()
    pruner.before_forward()
    (F.cross_entropy(model(x), y) * float("inf")).backward()
    pruner.after_step(grad_scale=65536.0)
    assert torch.equal(torch.cat([g.theta for g in gates_of(model)]), before)
    assert pruner.skipped_steps == 1


@pytest.mark.slow
def test_bf16_channels_last_clipped_run_trains_and_prunes(tmp_path):
    common = ["train.epochs=2", "train.max_steps_per_epoch=20", "prune.warmup_epochs=0", "prune.check_every=5",
              "train.progress=false", "tracking.enabled=false"]
    mixed = run(load_config("configs/smoke.yaml", [*common, "train.amp=bf16", "train.channels_last=true",
                                                   "train.grad_clip=2.0"]), tmp_path / "bf16", log=lambda _: None)
    plain = run(load_config("configs/smoke.yaml", common), tmp_path / "fp32", log=lambda _: None)
    assert mixed["amp"] == "bf16" and mixed["prune_events"], "the bf16 run must prune"
    history = json.loads((tmp_path / "bf16" / "history.json").read_text())
    losses = [h["train_loss"] for h in history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0], f"bf16 must learn: {losses}"
    a = torch.load(tmp_path / "bf16" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "fp32" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a), "autocast must change the run"
    assert plain["prune_events"]
