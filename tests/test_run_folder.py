"""Run folders as the user names them: `--out` on a folder that holds a run is refused (never two runs' files or
checkpoints mixed) unless --overwrite; a bad --out fails before any work; a broken config.yaml is named and the
checkpoint's copy offered; a finished run is not resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cap.engine.checkpoint import CHECKPOINT_DIR, read_checkpoint
from cap.engine.config import load_config
from cap.engine.run import Preempted, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.train_subset=300", "data.test_subset=100", "train.max_steps_per_epoch=3", "train.progress=false",
        "tracking.enabled=false", "prune.warmup_epochs=0"]


def cap(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cap", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A tiny run of 2 epochs, done."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(load_config("configs/smoke.yaml", [*TINY, "train.epochs=2"]), out, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A tiny run of 3 epochs stopped by SIGTERM after epoch 1 (its checkpoint: epoch 2, step 0)."""
    out = tmp_path_factory.mktemp("stopped") / "run"

    def stop_after_epoch_1(line: str) -> None:
        if line.startswith("epoch 1/3"):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        run(load_config("configs/smoke.yaml", [*TINY, "train.epochs=3"]), out, log=stop_after_epoch_1)
    return out


def test_out_on_a_run_folder_is_refused_and_overwrite_replaces_the_run_whole(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = files_of(out)
    refused = cap("train", "--config", "configs/smoke.yaml", "--out", str(out), *TINY, "prune.tau=0.3")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "already holds a run" in refused.stderr and f"cap train --resume {out}" in refused.stderr
    assert "new --out" in refused.stderr and "--overwrite" in refused.stderr
    assert files_of(out) == before, "a refused run must not touch the folder"

    (out / "checkpoints" / "prev.pt").touch()  # even a prev.pt newer than the run must not survive
    run(load_config("configs/smoke.yaml", [*TINY, "train.epochs=1", "prune.tau=0.3"]), out, log=lambda _: None,
        overwrite=True)
    assert yaml.safe_load((out / "config.yaml").read_text())["prune"]["tau"] == 0.3
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    assert sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir()) == ["last.pt"], \
        "the old run's checkpoints must be gone, not mixed with the new one's"
    assert read_checkpoint(out / CHECKPOINT_DIR / "last.pt")["config"]["prune"]["tau"] == 0.3


def test_overwrite_from_the_command_line(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = files_of(out)
    failed = cap("train", "--config", "configs/smoke.yaml", "--out", str(out), "--overwrite", *TINY,
                 f"data.root={tmp_path / 'no-data'}")
    assert failed.returncode == 2 and "no-data" in failed.stderr, failed.stderr
    assert files_of(out) == before, "a run that fails before it starts must not remove the old one"
    done = cap("train", "--config", "configs/smoke.yaml", "--out", str(out), "--overwrite", *TINY, "train.epochs=1",
               "prune.tau=0.3")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "summary.json").read_text())["tau"] == 0.3


@pytest.mark.parametrize("where,message", [("a_file", "is a file"), ("under_a_file", "cannot be written"),
                                           ("proc", "cannot be written")])
def test_a_bad_out_fails_before_the_data_loads(tmp_path, where, message):
    (tmp_path / "a_file").write_text("mine")
    out = {"a_file": tmp_path / "a_file", "under_a_file": tmp_path / "a_file" / "run",
           "proc": Path("/proc/cap-run-folder")}[where]
    # the data root does not exist: the --out check must come first
    done = cap("train", "--config", "configs/smoke.yaml", "--out", str(out), *TINY, f"data.root={tmp_path / 'no'}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: --out {out} {message}") and "Traceback" not in done.stderr
    assert (tmp_path / "a_file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"], "a refused run writes nothing"


@pytest.mark.parametrize("content,problem", [("", "is empty"), ("model: {name: [resnet20\n", "is not valid YAML"),
                                             ("- 1\n- 2\n", "holds a list"), (None, "is missing")])
def test_a_broken_config_yaml_is_named_and_the_checkpoint_copy_restores_it(stopped, tmp_path, content, problem):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    original = (out / "config.yaml").read_text()
    if content is None:
        (out / "config.yaml").unlink()
    else:
        (out / "config.yaml").write_text(content)
    refused = cap("train", "--resume", str(out))
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"error: {out / 'config.yaml'} {problem}")
    assert f"cap train --resume {out} --restore-config" in refused.stderr

    done = cap("train", "--resume", str(out), "--restore-config")
    assert done.returncode == 0, done.stderr
    assert f"restored {out / 'config.yaml'}" in done.stdout and "epoch 2, step 0" in done.stdout
    assert yaml.safe_load((out / "config.yaml").read_text()) == yaml.safe_load(original)
    kept = list(out.glob("config.yaml.replaced-*"))
    assert [p.read_text() for p in kept] == ([] if content is None else [content]), "the broken file is kept"
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3


def test_resume_of_a_finished_run_says_so_and_exits_0(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = files_of(out)
    done = cap("train", "--resume", str(out))
    assert done.returncode == 0, done.stderr
    assert f"{out} has finished all 2 epochs: nothing to resume" in done.stdout
    assert "epoch 3" not in done.stdout and "resuming" not in done.stdout
    assert files_of(out) == before


def test_an_edited_config_yaml_is_named_with_the_keys_that_differ(stopped, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    raw = yaml.safe_load((out / "config.yaml").read_text())
    raw["prune"]["tau"] = 0.5
    (out / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    before = files_of(out)
    refused = cap("train", "--resume", str(out))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "no usable checkpoint" in refused.stderr
    assert "belongs to another run: prune.tau is 0.8 in it, 0.5 in config.yaml" in refused.stderr
    assert f"cap train --resume {out} --restore-config" in refused.stderr
    assert files_of(out) == before
