"""The Torch-Pruning peer baseline (tools/peers/torch_pruning_baseline.py): its shortcut handling is exact, and a
tiny run hits the MAC target and writes a cap-like summary."""

import copy
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_pruning")

from cap.core.gates import set_gate_mode  # noqa: E402
from cap.engine.config import load_config  # noqa: E402
from cap.models import create_model  # noqa: E402

_PATH = Path(__file__).resolve().parents[1] / "tools" / "peers" / "torch_pruning_baseline.py"
_spec = importlib.util.spec_from_file_location("torch_pruning_baseline", _PATH)
tpb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpb)


def test_pruned_net_equals_dense_net_with_the_pruned_channels_zeroed():
    """Option-A shortcuts swapped and pruned by Torch-Pruning: the small network computes exactly what the
    dense one does with every removed channel (BN outputs, shortcut outputs) forced to zero."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1, input_size=32, width=8)
    set_gate_mode(model, "dense")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(2, 1, 32, 32)
    reference = model(x)
    assert tpb.make_tp_compatible(model) == 2
    assert torch.equal(model(x), reference)

    dense, pruned = copy.deepcopy(model), copy.deepcopy(model)
    names = {m: n for n, m in pruned.named_modules()}
    removed: dict[str, set[int]] = {}
    for group in tpb.build_pruner(pruned, 0.4).step(interactive=True):
        for dep, idxs in group:
            layer = dep.target.module
            if isinstance(layer, torch.nn.BatchNorm2d | tpb.ChannelMapShortcut) and \
                    dep.handler.__name__ == "prune_out_channels":
                removed.setdefault(names[layer], set()).update(int(i) for i in idxs)
        group.prune()
    tpb.sync_gates(pruned)
    assert len(removed) == 1 + 9 + 9 + 2  # stem BN, every bn1 and bn2, both option-A shortcuts

    def zero_channels(idxs: list[int]):
        def hook(_module, _inputs, out):
            out = out.clone()
            out[:, idxs] = 0
            return out
        return hook

    modules = dict(dense.named_modules())
    for name, idxs in removed.items():
        modules[name].register_forward_hook(zero_channels(sorted(idxs)))
    with torch.no_grad():
        out, small = dense(x), pruned(x)
    assert torch.allclose(small, out, atol=1e-5 * float(out.abs().max()))
    assert all(g.size == b.conv1.out_channels for b in pruned.blocks() for g in b.unit_gates())
    assert tpb.count_macs(pruned) == pytest.approx(float(tpb.expected_cost(pruned).macs), rel=1e-6)


@pytest.mark.slow
def test_tiny_run_hits_the_mac_target(tmp_path):
    cfg = load_config("configs/fmnist_resnet20.yaml", [
        "data.train_subset=512", "data.test_subset=256", "train.epochs=2", "train.max_steps_per_epoch=4",
        "train.progress=false"])
    start = time.perf_counter()
    summary = tpb.run_torch_pruning(cfg, target_mac_ratio=0.5, prune_at=0.5, out_dir=tmp_path, log=lambda *_: None)
    elapsed = time.perf_counter() - start
    assert elapsed < 60
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert abs(summary["mac_ratio"] / 0.5 - 1) <= 0.03
    assert summary["macs_final"] == summary["macs_after_prune"] < summary["macs_dense"]
    assert summary["macs_final"] == pytest.approx(summary["macs_final_cap"], rel=1e-6)  # two counters agree
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert summary["params_final"] < summary["params_dense"]
    assert summary["units_kept"] < summary["units_total"]
    assert summary["method"] == "torch-pruning" and summary["prune_epoch"] == 1
    assert len(summary["epoch_seconds"]) == summary["epochs"] == 2
    for key in ("macs_dense", "params_dense", "param_ratio", "train_seconds", "peak_memory_mb", "model",
                "dataset", "prune_at", "target_mac_ratio"):
        assert key in summary
