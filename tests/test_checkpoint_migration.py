"""Checkpoints and run folders written before the engine refactor (checkpoint format 1, commit 3eb0b2b) still
resume and export; `cap.engine.state.migrate` turns every older payload into the current schema."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from cap.deploy import export, load_compact, load_run_model
from cap.engine.checkpoint import CHECKPOINT_DIR, CheckpointError, read_checkpoint
from cap.engine.config import to_dict
from cap.engine.loop import new_meter
from cap.engine.run import resume
from cap.engine.state import FORMAT, migrate

DATA = Path(__file__).resolve().parent / "data"
STOPPED = DATA / "run_format1"  # stopped by SIGTERM after step 3 of epoch 2 (of 2)
DONE = DATA / "run_format1_done"  # the same run, never stopped
PAYLOAD_KEYS = {"format", "config", "world_size", "arch", "model", "optimizer", "scheduler", "scaler", "pruner",
                 "position", "meters", "history", "trajectory", "rng", "tracking_run_id"}


def old_payload() -> dict:
    payload = read_checkpoint(STOPPED / CHECKPOINT_DIR / "last.pt")
    assert payload["format"] == 1, "the fixture is a checkpoint of the code before the refactor"
    return payload


def oldest_payload() -> dict:
    """The fixture as format 1's earliest writers left it: rank 0's meter only, no non-finite count, no keep
    rule tables, no theta_mean_sq, no prune.lock_kept in the stored config."""
    payload = old_payload()
    del payload["meters"]
    del payload["meter"]["nonfinite_steps"], payload["meter"]["loss_seen"]
    del payload["config"]["prune"]["lock_kept"]
    pruner = payload["pruner"]
    del pruner["locked"], pruner["theta_mean_sq"], pruner["monitor"]["keep_streak"]
    del pruner["state"]["locked_at_harden"]
    return payload


def test_migrate_keeps_what_a_late_format_1_checkpoint_holds():
    old = old_payload()
    before = copy.deepcopy(old)
    new = migrate(old)
    assert new["format"] == FORMAT == 4 and set(new) == PAYLOAD_KEYS
    assert new["meters"] == before["meters"] and new["meters"][0] == before["meter"]
    kept = {s: {k: v for k, v in new["config"][s].items() if k in before["config"][s]} if isinstance(v0, dict) else
            new["config"][s] for s, v0 in before["config"].items()}
    assert kept == before["config"], "a config that had every key of its time keeps its values"
    assert new["config"]["prune"]["target_macs"] is None and new["config"]["train"]["lr_rewind"] is None
    assert new["config"]["prune"]["sample_fraction"] == 1.0
    assert new["pruner"]["state"]["multiplier"] == 1.0
    assert new["pruner"]["locked"].keys() == before["pruner"]["locked"].keys()
    assert all(torch.equal(new["pruner"]["locked"][k], t) for k, t in before["pruner"]["locked"].items())
    assert new["pruner"]["monitor"].keys() == before["pruner"]["monitor"].keys()
    assert old.keys() == before.keys() and old["format"] == 1, "the argument is not modified"


def test_migrate_fills_in_what_early_format_1_checkpoints_lack():
    old = oldest_payload()
    new = migrate(old)
    assert new["format"] == FORMAT and set(new) == PAYLOAD_KEYS
    meter = old["meter"]
    assert new["meters"] == [{**meter, "nonfinite_steps": 0, "loss_seen": meter["seen"]}] * old["world_size"]
    assert set(new["meters"][0]) == set(new_meter())
    assert new["config"]["prune"]["lock_kept"] is False, "a run from before the keep rule resumes without it"
    pruner = new["pruner"]
    assert pruner["locked"] == {} and pruner["theta_mean_sq"] == {} and pruner["monitor"]["keep_streak"] == {}
    assert pruner["state"]["locked_at_harden"] is None
    assert "lock_kept" not in old["config"]["prune"] and "locked" not in old["pruner"], "argument not modified"


def test_migrate_of_the_current_format_and_of_unknown_ones():
    current = migrate(old_payload())
    assert migrate(current) is current
    for bad in (0, FORMAT + 1, None):
        with pytest.raises(CheckpointError, match=f"format {bad!r} is not supported"):
            migrate({**current, "format": bad})


def test_a_format_1_run_folder_resumes_and_exports(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(STOPPED, run_dir)
    old = old_payload()
    lines: list[str] = []
    summary = resume(run_dir, log=lines.append)
    assert lines[0].startswith(f"resuming {run_dir}") and "epoch 2, step 3" in lines[0]
    assert any(line.startswith("epoch 2/2") for line in lines)
    assert summary["epochs"] == 2 and summary["steps_per_epoch"] == 6
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2] and history[0] == old["history"][0]
    events = [dict(e) for e in old["pruner"]["state"]["events"]]
    assert events and summary["prune_events"][:len(events)] == events, "what was pruned before the stop stays"

    written = read_checkpoint(run_dir / CHECKPOINT_DIR / "last.pt")
    assert written["format"] == FORMAT and set(written) == PAYLOAD_KEYS
    assert written["position"]["epoch"] == 2 and written["position"]["step_in_epoch"] == 0
    migrated = migrate(old)
    assert to_dict_keys(written) == to_dict_keys(migrated), "a migrated payload has the schema new code writes"
    check_export(run_dir, tmp_path / "compact", summary)


def test_a_finished_format_1_run_folder_exports(tmp_path):
    check_export(DONE, tmp_path / "compact", json.loads((DONE / "summary.json").read_text()))


def to_dict_keys(payload: dict) -> dict:
    """The key structure of a payload (nested dicts of the pruner and meters), without the values."""
    pruner = payload["pruner"]
    return {"top": set(payload), "pruner": set(pruner), "monitor": set(pruner["monitor"]),
            "state": set(pruner["state"]), "meters": [set(m) for m in payload["meters"]],
            "config": {k: set(v) if isinstance(v, dict) else None for k, v in payload["config"].items()},
            "position": set(payload["position"])}


def check_export(run_dir: Path, out: Path, summary: dict) -> None:
    export(run_dir, out)
    compact = load_compact(out)
    arch = json.loads((out / "arch.json").read_text())
    assert arch["macs"] == summary["macs_final"] and arch["params"] == summary["params_final"]
    gated, _ = load_run_model(run_dir)
    gated.eval()
    shape = (8, gated.in_channels, gated.input_size, gated.input_size)
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(compact(images), gated(images), atol=1e-5), "the compact net is the trained one"


def test_the_fixture_config_matches_its_checkpoint():
    """The stopped run's config.yaml is what its checkpoint stores (resume compares the two)."""
    from cap.engine.config import load_saved_config

    assert to_dict(load_saved_config(STOPPED / "config.yaml")) == migrate(old_payload())["config"]
