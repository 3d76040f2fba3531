"""A run folder's config.yaml when resuming: a missing, empty or broken one is named, and the copy of the
configuration that every checkpoint holds is offered in its place (`cap train --resume RUN --restore-config`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from cap.engine.checkpoint import CHECKPOINT_DIR
from cap.engine.config import Config, ConfigError, build_config, load_saved_config, to_dict

CONFIG_FILE = "config.yaml"


def _problem(path: Path) -> str | None:
    """What is wrong with a saved config.yaml before validation (None: it is a mapping of sections)."""
    if not path.is_file():
        return "is missing"
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot be read ({exc})"
    except yaml.YAMLError as exc:
        return f"is not valid YAML ({' '.join(str(exc).split())})"
    if not text.strip() or data is None:
        return "is empty"
    if not isinstance(data, dict):
        return f"holds a {type(data).__name__}, not the mapping of sections (model, data, train, ...) it should"
    return None


def load_run_config(run_dir: Path) -> Config:
    """The configuration `run_dir` was started with, from its config.yaml; ConfigError naming the file and
    offering the checkpoint's copy when it is missing, empty, broken or invalid."""
    path = run_dir / CONFIG_FILE
    problem = _problem(path)
    if problem is None:
        try:
            return load_saved_config(path)
        except ConfigError as exc:
            problem = f"is not a valid configuration: {exc}"
    raise ConfigError(f"{path} {problem}. The checkpoints in {run_dir / CHECKPOINT_DIR} hold the configuration "
                      f"the run was started with; resume with it: cap train --resume {run_dir} --restore-config")


def restore_config(run_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Write the configuration stored in the newest good checkpoint of `run_dir` back to its config.yaml; the
    file it replaces (if any) is kept beside it as config.yaml.replaced-<time>."""
    from cap.engine.state import load  # the checkpoint schema and its migrations

    saved, checkpoint = load(run_dir / CHECKPOINT_DIR, log)
    path = run_dir / CONFIG_FILE
    tmp = path.with_name(f".{CONFIG_FILE}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(to_dict(build_config(saved["config"])), sort_keys=False))
    if path.exists():
        kept = path.with_name(f"{CONFIG_FILE}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, kept)
        log(f"kept the replaced {path} as {kept}")
    os.replace(tmp, path)
    log(f"restored {path} from the configuration stored in {checkpoint}")
    return path
