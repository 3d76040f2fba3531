"""The folder a new run writes to: checked before any work, and never shared by two runs.

A folder that already holds a run (its config.yaml, checkpoints or results) is refused unless the user asks to
overwrite it: writing a second run into it would replace the first one's results and leave its `prev.pt` beside
the new `last.pt`, so a resume could mix the two. With overwrite, the first run's files are removed before the
new run starts; its tracking files stay (cap.tracking sets an unsent queue aside for `cap sync`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cap.engine.checkpoint import CHECKPOINT_DIR
from cap.engine.config import ConfigError

RUN_FILES = ("config.yaml", CHECKPOINT_DIR, "summary.json", "history.json", "model.pt", "structure.png",
             "thetas.png", "export")
"""what a run (cap.engine.run, cap.engine.outputs) and `cap export` write into a run folder"""
_MARKERS = RUN_FILES[:5]
"""any of these makes a folder a run's"""


class RunFolderError(ConfigError):
    """The run folder given (--out) cannot take a new run; the message says why and what to do instead."""


def run_files(path: Path) -> list[str]:
    """The files of a run that `path` holds (empty: it holds no run)."""
    return [name for name in _MARKERS if (path / name).exists()]


def prepare_run_folder(path: Path, overwrite: bool = False) -> None:
    """Create `path` for a new run, or refuse it: a file, a folder that cannot be written, a folder that holds a
    run (unless `overwrite`: then that run's files are removed first)."""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"--out {path} is a file, not a folder: give a folder for the run")
    found = run_files(path) if path.is_dir() else []
    if found and not overwrite:
        raise RunFolderError(f"--out {path} already holds a run ({', '.join(found)}): continue it with "
                             f"`cap train --resume {path}`, give a new --out folder, or pass --overwrite to "
                             "replace that run")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".cap-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunFolderError(f"--out {path} cannot be written: {exc.strerror or exc} "
                             f"({exc.filename or path}); give a folder you can write to") from exc
    for name in RUN_FILES if found else ():
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
