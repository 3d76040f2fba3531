"""Checkpoints and resume: atomic checksummed files, fallback to the previous one, and resumed runs that
are bit-identical to uninterrupted ones (single process, fixed seed), also after surgery shrank the net."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cap.engine.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    StopRequest,
    load_latest,
    read_checkpoint,
    save_checkpoint,
)
from cap.engine.config import load_config
from cap.engine.run import Preempted, resume, run
from cap.models import build_from_architecture, create_model

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["train.epochs=3", "train.progress=false", "tracking.enabled=false"]


# ---------------------------------------------------------------------------- checkpoint files
def test_checkpoint_round_trip_and_rotation(tmp_path):
    save_checkpoint({"a": torch.arange(3), "epoch": 1}, tmp_path)
    save_checkpoint({"a": torch.arange(4), "epoch": 2}, tmp_path)
    payload, path = load_latest(tmp_path)
    assert path.name == "last.pt" and payload["epoch"] == 2 and torch.equal(payload["a"], torch.arange(4))
    assert read_checkpoint(tmp_path / "prev.pt")["epoch"] == 1, "the previous good checkpoint is kept"
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"


def test_truncated_checkpoint_falls_back_to_previous(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path)
    save_checkpoint({"epoch": 2, "w": torch.randn(1000)}, tmp_path)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:-100])
    warnings: list[str] = []
    payload, path = load_latest(tmp_path, warnings.append)
    assert payload["epoch"] == 1 and path.name == "prev.pt"
    assert any("truncated or corrupt" in w and "last.pt" in w for w in warnings)


def test_a_damaged_last_is_never_rotated_over_the_previous(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path)
    save_checkpoint({"epoch": 2}, tmp_path)
    (tmp_path / "last.pt").write_bytes(b"CAPCKPT1\n" + b"0" * 64 + b"\n" + b"garbage")
    save_checkpoint({"epoch": 3}, tmp_path)
    assert read_checkpoint(tmp_path / "prev.pt")["epoch"] == 1 and load_latest(tmp_path)[0]["epoch"] == 3


def test_corrupt_checkpoints_give_a_clear_error(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path)
    save_checkpoint({"epoch": 2}, tmp_path)
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    data = bytearray(last.read_bytes())
    data[-5] ^= 0xFF
    last.write_bytes(bytes(data))
    prev.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as err:
        load_latest(tmp_path, lambda _: None)
    message = str(err.value)
    assert "no usable checkpoint" in message and "last.pt is truncated or corrupt" in message
    assert "prev.pt is not a cap checkpoint" in message


class Evil:
    """Any class: a checkpoint is loaded with weights_only=True, so unpickling it must be refused."""


def test_checkpoint_refuses_pickled_objects(tmp_path):
    save_checkpoint({"obj": Evil()}, tmp_path)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        read_checkpoint(tmp_path / "last.pt")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_stop_request_catches_the_signal_and_restores_handlers(sig):
    before = signal.getsignal(sig)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), sig)
        assert stop.requested and stop.signal_name == signal.Signals(sig).name
    assert signal.getsignal(sig) == before


# ---------------------------------------------------------------------------- resumed training
_REFERENCE: dict = {}


def reference(tmp_path_factory) -> Path:
    """configs/smoke.yaml for 3 epochs, never interrupted."""
    if "out" not in _REFERENCE:
        out = tmp_path_factory.mktemp("uninterrupted")
        summary = run(load_config("configs/smoke.yaml", OVERRIDES), out, log=lambda _: None)
        assert summary["theta_locked"] > 0, "the resumed runs must also carry keep-rule locks across the stop"
        _REFERENCE["out"] = out
    return _REFERENCE["out"]


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    assert ma["arch"] == mb["arch"]
    assert ma["state_dict"].keys() == mb["state_dict"].keys()
    different = [k for k in ma["state_dict"] if not torch.equal(ma["state_dict"][k], mb["state_dict"][k])]
    assert not different, f"weights/thetas differ after resume: {different[:5]}"
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (a, b))
    for ra, rb in zip(ha, hb, strict=True):
        ra.pop("epoch_seconds"), rb.pop("epoch_seconds")
        assert ra == rb
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["prune_events"] == sb["prune_events"]


@pytest.mark.slow
def test_stop_after_surgery_and_resume_equals_uninterrupted(tmp_path_factory):
    ref = reference(tmp_path_factory)
    out = tmp_path_factory.mktemp("stopped")

    def stop_after_epoch_2(line: str) -> None:
        if line.startswith("epoch 2/3"):
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler's preemption sends

    with pytest.raises(Preempted):
        run(load_config("configs/smoke.yaml", OVERRIDES), out, log=stop_after_epoch_2)
    assert not (out / "model.pt").exists()
    checkpoint = read_checkpoint(out / CHECKPOINT_DIR / "last.pt")
    assert checkpoint["position"] == {**checkpoint["position"], "epoch": 2, "step_in_epoch": 0}
    arch = checkpoint["arch"]
    shrunk, dense = build_from_architecture(arch), create_model(arch["name"], **arch["kwargs"])
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in dense.parameters()), \
        "the checkpoint must hold a network that surgery already shrank"

    lines: list[str] = []
    resume(out, log=lines.append)
    assert lines[0].startswith(f"resuming {out}") and "epoch 3, step 0" in lines[0]
    assert_same_run(ref, out)


@pytest.mark.slow
def test_sigterm_mid_epoch_then_cli_resume_equals_uninterrupted(tmp_path_factory):
    ref = reference(tmp_path_factory)
    out = tmp_path_factory.mktemp("sigterm")
    cmd = [sys.executable, "-m", "cap", "train", "--config", "configs/smoke.yaml", "--out", str(out), *OVERRIDES]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1/3"):
            time.sleep(2.0)  # well inside epoch 2
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, "".join(lines) + rest
    assert "stopped by SIGTERM in epoch 2 after step" in rest and "--resume" in rest
    step = read_checkpoint(out / CHECKPOINT_DIR / "last.pt")["position"]["step_in_epoch"]
    assert 0 < step < 47, f"expected a mid-epoch stop, got step {step}"

    done = subprocess.run([sys.executable, "-m", "cap", "train", "--resume", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"epoch 2, step {step}" in done.stdout
    assert_same_run(ref, out)


def test_resume_with_only_corrupt_checkpoints_fails_clearly_and_keeps_files(tmp_path):
    (tmp_path / "config.yaml").write_text((ROOT / "configs" / "smoke.yaml").read_text())
    ckpt = tmp_path / CHECKPOINT_DIR
    ckpt.mkdir()
    (ckpt / "last.pt").write_bytes(b"CAPCKPT1\n" + b"0" * 64 + b"\n" + b"garbage")
    before = (ckpt / "last.pt").read_bytes()
    done = subprocess.run([sys.executable, "-m", "cap", "train", "--resume", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "no usable checkpoint" in done.stderr and "last.pt is truncated or corrupt" in done.stderr
    assert (ckpt / "last.pt").read_bytes() == before, "a failed resume must not touch what is saved"


def test_resume_refuses_overrides(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cap", "train", "--resume", str(tmp_path), "prune.tau=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cannot be combined" in done.stderr


def test_resume_of_a_folder_without_checkpoints(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cap", "train", "--resume", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and f"no {CHECKPOINT_DIR}/ folder" in done.stderr


@pytest.mark.slow
def test_a_run_checkpointed_before_the_keep_rule_resumes_without_it(tmp_path):
    """A run folder from before prune.lock_kept existed (the key missing from config.yaml and the checkpoint)
    resumes with the behaviour it was started with, not with the new default."""
    import yaml

    out = tmp_path / "old"

    def stop_after_epoch_1(line: str) -> None:
        if line.startswith("epoch 1/3"):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        run(load_config("configs/smoke.yaml", [*OVERRIDES, "prune.lock_kept=false"]), out, log=stop_after_epoch_1)
    raw = yaml.safe_load((out / "config.yaml").read_text())
    del raw["prune"]["lock_kept"]
    (out / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    checkpoint = read_checkpoint(out / CHECKPOINT_DIR / "last.pt")
    checkpoint["format"] = 1  # what the code of that time wrote (cap.engine.state.migrate upgrades it)
    del checkpoint["config"]["prune"]["lock_kept"]
    checkpoint["pruner"].pop("locked")
    checkpoint["pruner"]["monitor"].pop("keep_streak")
    save_checkpoint(checkpoint, out / CHECKPOINT_DIR)
    summary = resume(out, log=lambda _: None)
    assert summary["theta_locked"] == 0, "the old run must not switch to the keep rule half-way"
    assert summary["theta_undecided"] > 0  # without the rule thetas are still walking (this config never hardens)


# ---------------------------------------------------------------------------- Ctrl-C, full disks, foreign files
TINY = ["data.train_subset=300", "data.test_subset=100", "train.max_steps_per_epoch=3", "train.progress=false",
        "tracking.enabled=false", "prune.warmup_epochs=0"]


def test_a_first_ctrl_c_asks_for_a_stop_and_a_second_interrupts_at_once():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"  # no KeyboardInterrupt: the step finishes
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == before


@pytest.mark.slow
def test_ctrl_c_mid_epoch_checkpoints_exits_130_and_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cap", "train", "--config", "configs/smoke.yaml", "--out", str(out),
           "train.epochs=2", "tracking.enabled=false", "train.progress=true"]  # the bar is drawn, then cleared
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 1/2"):
            time.sleep(2.0)  # well inside epoch 2
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    stop_line = next(line for line in stderr.split("\n") if "stopped by SIGINT" in line)
    assert stop_line.startswith("stopped by SIGINT in epoch 2 after step"), repr(stop_line)  # its own line
    assert stop_line.endswith(f"continue with: cap train --resume {out}")
    step = read_checkpoint(out / CHECKPOINT_DIR / "last.pt")["position"]["step_in_epoch"]
    assert 0 < step < 46, f"expected a mid-epoch stop, got step {step}"
    done = subprocess.run([sys.executable, "-m", "cap", "train", "--resume", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"epoch 2, step {step}" in done.stdout and (out / "summary.json").is_file()


@pytest.fixture()
def small_disk(tmp_path, monkeypatch) -> Path:
    """A folder on a 3 MiB tmpfs: room for one checkpoint of a TINY run (2.2 MB), not for two. Where mounting is
    not allowed, a patched write that fails with ENOSPC once 3 MiB were written through it."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    if not mounted:
        import builtins
        import errno

        import cap.engine.checkpoint as checkpoint

        budget = [3 * 2**20]

        class Full:
            def __init__(self, f):
                self.f = f

            def write(self, data: bytes) -> int:
                room = max(budget[0], 0)
                budget[0] -= len(data)
                self.f.write(data[:room])
                if len(data) > room:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return len(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        monkeypatch.setattr(checkpoint, "open", lambda *a, **k: Full(builtins.open(*a, **k)), raising=False)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_temporary(small_disk):
    from cap.engine.checkpoint import DiskFullError

    (small_disk / ".last.pt.tmp-999999").write_bytes(b"x" * 1000)  # left by a writer that died
    save_checkpoint({"w": torch.ones(2**18)}, small_disk)  # 1 MiB
    assert not list(small_disk.glob(".last.pt.tmp-*")), "a dead writer's temporary is removed by the next write"
    before = (small_disk / "last.pt").read_bytes()
    with pytest.raises(DiskFullError) as raised:
        save_checkpoint({"w": torch.ones(2**20)}, small_disk)  # 4 MiB
    message = str(raised.value)
    assert f"no space left on the device of {small_disk} for a checkpoint: it needs 4.0 MiB free" in message
    assert "MiB are free" in message and f"last good checkpoint is intact ({small_disk / 'last.pt'})" in message
    assert (small_disk / "last.pt").read_bytes() == before
    assert not (small_disk / "prev.pt").exists()
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.pt"], "no temporary may stay behind"


def test_disk_full_during_training_says_so_and_the_run_resumes_after(small_disk, capsys):
    from cap.cli import main

    out = small_disk / "run"
    code = main(["train", "--config", "configs/smoke.yaml", "--out", str(out), "train.epochs=2", *TINY])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith(f"error: no space left on the device of {out / CHECKPOINT_DIR} for a checkpoint")
    assert f"continue with: cap train --resume {out}" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir()) == ["last.pt"]
    assert read_checkpoint(out / CHECKPOINT_DIR / "last.pt")["position"]["epoch"] == 1  # epoch 1's, intact


def test_disk_full_at_the_results_says_so_and_the_resume_writes_them(small_disk, capsys):
    """One epoch: its checkpoint (2.2 MB) fits the 3 MiB disk, the results after it (model.pt first) do not."""
    from cap.cli import main

    if not os.path.ismount(small_disk):
        pytest.skip("needs a small tmpfs (mount as root): the results are written by torch and json, not one open")
    out = small_disk / "run"
    code = main(["train", "--config", "configs/smoke.yaml", "--out", str(out), "train.epochs=1", *TINY])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith(f"error: no space left on the device of {out} for the run's results")
    assert f"write them with: cap train --resume {out}" in err and "Traceback" not in err
    assert not (out / "summary.json").exists(), "an unfinished set of results must not mark the run finished"
    assert not list(out.glob(".*.tmp")), "no temporary may stay behind"
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # space freed
    assert main(["train", "--resume", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    saved = torch.load(out / "model.pt", weights_only=True)
    build_from_architecture(saved["arch"]).load_state_dict(saved["state_dict"])


@pytest.mark.slow
def test_a_last_pt_of_another_model_falls_back_to_prev_pt_and_says_why(tmp_path):
    out, other = tmp_path / "run", tmp_path / "other"

    def stop_after_epoch_2(line: str) -> None:
        if line.startswith("epoch 2/3"):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        run(load_config("configs/smoke.yaml", [*TINY, "train.epochs=3"]), out, log=stop_after_epoch_2)
    run(load_config("configs/smoke.yaml", [*TINY, "train.epochs=1", "model.name=resnet32"]), other,
        log=lambda _: None)
    (other / CHECKPOINT_DIR / "last.pt").replace(out / CHECKPOINT_DIR / "last.pt")
    lines: list[str] = []
    summary = resume(out, log=lines.append)
    assert lines[0].startswith(f"warning: checkpoint {out / CHECKPOINT_DIR / 'last.pt'} belongs to another run: "
                               "model.name is 'resnet32' in it, 'resnet20' in config.yaml;")
    assert lines[0].endswith("; trying the previous checkpoint")
    assert f"resuming {out} from {out / CHECKPOINT_DIR / 'prev.pt'}: epoch 2, step 0" in lines
    assert summary["model"] == "resnet20" and summary["epochs"] == 3
