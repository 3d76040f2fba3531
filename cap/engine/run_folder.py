"""The folder a new run writes to: checked before any work, and never shared by two runs.

A folder that already holds a run (its config.yaml, checkpoints or results) is refused unless the user asks to
overwrite it: writing a second run into it would replace the first one's results and leave its `prev.pt` beside
the new `last.pt`, so a resume could mix the two. With overwrite, the first run's files are removed once the new
run's data and model are built (a run that fails before removes nothing); its tracking files stay (cap.tracking
sets an unsent queue aside for `cap sync`). The checks write nothing, so a refused run leaves no folder behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cap.engine.checkpoint import CHECKPOINT_DIR
from cap.engine.config import ConfigError

RUN_FILES = ("config.yaml", CHECKPOINT_DIR, "summary.json", "history.json", "model.pt", "structure.png",
             "thetas.png", "export", ".summary.json.tmp")
"""what a run (cap.engine.run, cap.engine.outputs) and `cap export` write into a run folder"""
_MARKERS = RUN_FILES[:5]
"""any of these makes a folder a run's"""


class RunFolderError(ConfigError):
    """The run folder given (--out) cannot take a new run; the message says why and what to do instead."""


def run_files(path: Path) -> list[str]:
    """The files of a run that `path` holds (empty: it holds no run)."""
    return [name for name in _MARKERS if (path / name).exists()]


def check_run_folder(path: Path, overwrite: bool = False) -> None:
    """Refuse `path` for a new run, before any work and without writing anything: a file, a place that cannot be
    written, a folder that holds a run (unless `overwrite`)."""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"--out {path} is a file, not a folder: give a folder for the run")
    found = run_files(path) if path.is_dir() else []
    if found and not overwrite:
        raise RunFolderError(f"--out {path} already holds a run ({', '.join(found)}): continue it with "
                             f"`cap train --resume {path}`, give a new --out folder, or pass --overwrite to "
                             "replace that run")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())  # where the folder would be made
    if not existing.is_dir():
        raise RunFolderError(f"--out {path} cannot be written: {existing} is a file; give a folder you can write to")
    probe = existing / f".cap-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunFolderError(f"--out {path} cannot be written: {exc.strerror or exc} in {existing}; give a folder "
                             "you can write to") from exc


def start_run_folder(path: Path, overwrite: bool = False) -> None:
    """Create `path` for a run that passed `check_run_folder`; with `overwrite`, first remove the files of the
    run it held (done once the new run's data and model are built, so a run that fails early removes nothing)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES if overwrite else ():
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
