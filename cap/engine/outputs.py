"""What a finished run leaves behind: summary.json, history.json, model.pt, plots, and the MLflow artifacts."""

from __future__ import annotations

import errno
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cap.engine.checkpoint import DiskFullError
from cap.engine.config import Config
from cap.tracking.links import NOTE_TAG, result_note


@dataclass
class RunResult:
    """Everything the result files of a finished run are written from."""

    out_dir: Path
    cfg: Config
    arch: dict
    """the final architecture (cap.core.arch.architecture)"""
    state_dict: dict[str, torch.Tensor]
    stats: dict[str, Any]
    """the pruner's final statistics (cap.core.pruner.Pruner.stats), with "structure" among them"""
    history: list[dict]
    trajectory: list[dict]
    dataset: str
    steps_per_epoch: int
    world_size: int
    pruning: bool
    """the pruner was on (tau > 0): the theta plot is drawn"""
    hardened_at_step: int | None
    theta_undecided_at_harden: int | None
    theta_locked_at_harden: int | None
    theta_steps_skipped: int
    prune_events: list[dict]
    tracking_run_id: str | None
    rank_digests: list[str]
    peak_memory_mb: float


def build_summary(result: RunResult) -> dict[str, Any]:
    cfg, history = result.cfg, result.history
    final = history[-1]
    return {
        "test_acc": final["test_acc"], "test_loss": final["test_loss"], "train_loss": final["train_loss"],
        **result.stats,
        "epoch_seconds": [r["epoch_seconds"] for r in history],
        "train_seconds": sum(r["epoch_seconds"] for r in history),
        "peak_memory_mb": result.peak_memory_mb,
        "tau": cfg.prune.tau, "alpha": cfg.prune.alpha, "beta": cfg.prune.beta,
        "dataset": result.dataset, "model": cfg.model.name, "epochs": cfg.train.epochs, "seed": cfg.seed,
        "steps_per_epoch": result.steps_per_epoch, "world_size": result.world_size,
        "global_batch_size": cfg.data.batch_size * result.world_size, "amp": cfg.train.amp,
        "hardened_at_step": result.hardened_at_step,
        "theta_undecided_at_harden": result.theta_undecided_at_harden,
        "theta_locked_at_harden": result.theta_locked_at_harden,
        "theta_steps_skipped": result.theta_steps_skipped,
        "prune_events": result.prune_events,
        "mlflow_run_id": result.tracking_run_id,
        "final_weights_sha256_per_rank": result.rank_digests,
    }


def write_outputs(result: RunResult, tracker, log: Callable[[str], None]) -> dict[str, Any]:
    """Write the run folder's result files and plots, hand them to the tracker; returns the summary."""
    from cap.engine.plots import plot_structure, plot_theta_trajectory

    out, cfg = result.out_dir, result.cfg
    summary = build_summary(result)
    title = f"{cfg.model.name} {result.dataset} tau={cfg.prune.tau:g} alpha={cfg.prune.alpha:g} " \
            f"beta={cfg.prune.beta:g}"
    try:
        (out / "history.json").write_text(json.dumps(result.history, indent=2))
        buffer = io.BytesIO()  # torch.save into a full file fails with a RuntimeError; a write says ENOSPC
        torch.save({"arch": result.arch, "state_dict": result.state_dict}, buffer)
        (out / "model.pt").write_bytes(buffer.getvalue())
        plots = [plot_structure(summary["structure"], out / "structure.png", title)]
        if result.pruning:
            plots.append(plot_theta_trajectory(result.trajectory, out / "thetas.png", title))
        # last, and whole or not at all: a summary.json marks the run finished (a resume then trains nothing)
        draft = out / ".summary.json.tmp"
        draft.write_text(json.dumps(summary, indent=2))
        draft.replace(out / "summary.json")
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            (out / ".summary.json.tmp").unlink(missing_ok=True)
            raise DiskFullError(errno.ENOSPC, f"no space left on the device of {out} for the run's results "
                                "(history.json, model.pt, plots, summary.json): training is done and its last "
                                f"checkpoint is kept; free space, then write them with: cap train --resume {out}") \
                from exc
        raise
    for name in ("config.yaml", "summary.json", "history.json", "model.pt"):
        tracker.log_artifact(out / name)
    for path in plots:
        tracker.log_artifact(path, "plots")
    tracker.log_metrics({"final_test_acc": summary["test_acc"], "mac_reduction": 1 - summary["mac_ratio"],
                         "param_reduction": 1 - summary["param_ratio"], "train_seconds": summary["train_seconds"]},
                        step=cfg.train.epochs)
    tracker.set_tags({"run_dir": str(out.resolve()), "model": cfg.model.name, "dataset": result.dataset,
                      NOTE_TAG: result_note(summary)})  # the run's description in the MLflow UI
    log(f"done: test_acc {summary['test_acc']:.4f}, MAC reduction {1 - summary['mac_ratio']:.1%}, "
        f"param reduction {1 - summary['param_ratio']:.1%}, blocks kept {summary['layers_kept']}/"
        f"{summary['layers_total']}, units kept {summary['units_kept']}/{summary['units_total']}; {out}")
    if summary["target_reached"] is False:  # the run says so, never silently misses
        log(f"warning: the budget target was not reached: {_targets(summary)} (see docs/method.md, "
            "\"Budget targets\": more epochs, unit gates, or a target the block structure allows)")
    return summary


def _targets(summary: dict[str, Any]) -> str:
    parts = [f"{kind} {summary[ratio]:.3f} of dense for a target of {summary[key]:g}"
             for kind, key, ratio in (("MACs", "target_macs", "mac_ratio"), ("params", "target_params", "param_ratio"))
             if summary[key] is not None]
    return ", ".join(parts)
