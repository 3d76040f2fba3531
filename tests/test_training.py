"""Real training on real Fashion-MNIST (a subset): pruning happens, and the three parameters mean
what docs/method.md says. Each run is configs/smoke.yaml on 2k images (~15 s on 2 cores) with one change."""

import json

import pytest
import torch

from cap.engine.config import load_config
from cap.engine.run import run
from cap.models import build_from_architecture

pytestmark = pytest.mark.slow
_CACHE: dict = {}
BASE = ["train.progress=false", "tracking.enabled=false", "data.train_subset=2000"]


def smoke(tmp_path_factory, *overrides):
    key = tuple(overrides)
    if key not in _CACHE:
        out = tmp_path_factory.mktemp("run")
        cfg = load_config("configs/smoke.yaml", [*BASE, *overrides])
        summary = run(cfg, out, log=lambda *_: None)
        _CACHE[key] = (summary, out)
    return _CACHE[key]


def units_removed_from_kept_blocks(summary) -> float:
    kept = [b for b in summary["structure"] if b["kept"]]
    return 1 - sum(b["units"] for b in kept) / max(sum(b["of"] for b in kept), 1)


def test_pruning_removes_units_and_blocks_and_keeps_accuracy(tmp_path_factory):
    summary, out = smoke(tmp_path_factory)
    kinds = {e["kind"] for e in summary["prune_events"]}
    assert kinds == {"units", "block"}, "neutral beta must remove both units and whole blocks"
    assert summary["layers_kept"] < summary["layers_total"]
    assert summary["units_kept"] < summary["units_total"]
    assert summary["macs_final"] < 0.8 * summary["macs_dense"]
    assert summary["test_acc"] > 0.5  # chance is 0.1
    saved = torch.load(out / "model.pt", weights_only=True)
    model = build_from_architecture(saved["arch"])
    model.load_state_dict(saved["state_dict"])
    thetas = torch.cat([g.theta for b in model.blocks() for g in [b.layer_gate, *b.unit_gates()]])
    assert len(thetas) and float(thetas.min()) <= 0.05  # some thetas reached (near) zero and still wait
    for key in ["test_acc", "macs_dense", "macs_final", "params_dense", "params_final", "layers_total",
                "layers_kept", "units_total", "units_kept", "theta_undecided", "epoch_seconds", "tau", "alpha",
                "beta", "dataset", "model", "epochs"]:
        assert key in summary
    assert json.loads((out / "summary.json").read_text())["test_acc"] == summary["test_acc"]
    assert (out / "config.yaml").is_file()


def test_tau_zero_trains_the_dense_network(tmp_path_factory):
    summary, _ = smoke(tmp_path_factory, "prune.tau=0", "train.epochs=2")
    assert summary["prune_events"] == []
    assert summary["macs_final"] == summary["macs_dense"]
    assert summary["units_kept"] == summary["units_total"]
    assert summary["layers_kept"] == summary["layers_total"]
    assert summary["test_acc"] > 0.5


def test_larger_tau_prunes_more(tmp_path_factory):
    low, _ = smoke(tmp_path_factory)
    high, _ = smoke(tmp_path_factory, "prune.tau=2.0")
    assert high["macs_final"] < 0.8 * low["macs_final"]
    assert high["params_final"] < low["params_final"]


def test_alpha_shifts_macs_against_parameters(tmp_path_factory):
    macs_only, _ = smoke(tmp_path_factory, "prune.alpha=1")
    params_only, _ = smoke(tmp_path_factory, "prune.alpha=0")

    def mac_over_param_cut(s):
        return (1 - s["macs_final"] / s["macs_dense"]) / (1 - s["params_final"] / s["params_dense"])

    assert mac_over_param_cut(macs_only) > mac_over_param_cut(params_only) + 0.1


def test_beta_moves_pruning_between_layers_and_units(tmp_path_factory):
    depth, _ = smoke(tmp_path_factory, "prune.beta=0.9")
    width, _ = smoke(tmp_path_factory, "prune.beta=0.1")
    assert depth["layers_kept"] < width["layers_kept"]
    assert units_removed_from_kept_blocks(width) > units_removed_from_kept_blocks(depth)
