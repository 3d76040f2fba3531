"""What a finished run leaves behind: summary.json, history.json, model.pt, plots, and the MLflow artifacts."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from cap.core.arch import architecture

if TYPE_CHECKING:
    from cap.engine.run import Training


def build_summary(training: Training, peak_memory_mb: float) -> dict[str, Any]:
    cfg, pruner, history = training.cfg, training.pruner, training.history
    final = history[-1]
    return {
        "test_acc": final["test_acc"], "test_loss": final["test_loss"], "train_loss": final["train_loss"],
        **pruner.stats(),
        "epoch_seconds": [r["epoch_seconds"] for r in history],
        "train_seconds": sum(r["epoch_seconds"] for r in history),
        "peak_memory_mb": peak_memory_mb,
        "tau": cfg.prune.tau, "alpha": cfg.prune.alpha, "beta": cfg.prune.beta,
        "dataset": training.data.name, "model": cfg.model.name, "epochs": cfg.train.epochs, "seed": cfg.seed,
        "steps_per_epoch": training.steps, "world_size": training.ctx.world_size,
        "global_batch_size": cfg.data.batch_size * training.ctx.world_size, "amp": cfg.train.amp,
        "hardened_at_step": pruner.state.harden_step,
        "theta_undecided_at_harden": pruner.state.undecided_at_harden,
        "theta_locked_at_harden": pruner.state.locked_at_harden,
        "theta_steps_skipped": pruner.skipped_steps,
        "prune_events": [vars(e) for e in pruner.state.events],
        "mlflow_run_id": training.tracking_run_id,
        "final_weights_sha256_per_rank": training.rank_digests,
    }


def write_outputs(training: Training, peak_memory_mb: float, tracker) -> dict[str, Any]:
    """Write the run folder's result files and plots, hand them to the tracker; returns the summary."""
    from cap.engine.plots import plot_structure, plot_theta_trajectory

    out, cfg = training.out_dir, training.cfg
    summary = build_summary(training, peak_memory_mb)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "history.json").write_text(json.dumps(training.history, indent=2))
    torch.save({"arch": architecture(training.model, cfg.model.name, training.kwargs),
                "state_dict": training.model.state_dict()}, out / "model.pt")
    title = f"{cfg.model.name} {training.data.name} tau={cfg.prune.tau:g} alpha={cfg.prune.alpha:g} " \
            f"beta={cfg.prune.beta:g}"
    plots = [plot_structure(summary["structure"], out / "structure.png", title)]
    if training.pruner.enabled:
        plots.append(plot_theta_trajectory(training.trajectory, out / "thetas.png", title))
    for name in ("config.yaml", "summary.json", "history.json", "model.pt"):
        tracker.log_artifact(out / name)
    for path in plots:
        tracker.log_artifact(path, "plots")
    tracker.log_metrics({"final_test_acc": summary["test_acc"], "mac_reduction": 1 - summary["mac_ratio"],
                         "param_reduction": 1 - summary["param_ratio"], "train_seconds": summary["train_seconds"]},
                        step=cfg.train.epochs)
    tracker.set_tags({"run_dir": str(out.resolve()), "model": cfg.model.name, "dataset": training.data.name})
    training.log(f"done: test_acc {summary['test_acc']:.4f}, MAC reduction {1 - summary['mac_ratio']:.1%}, "
                 f"param reduction {1 - summary['param_ratio']:.1%}, blocks kept {summary['layers_kept']}/"
                 f"{summary['layers_total']}, units kept {summary['units_kept']}/{summary['units_total']}; {out}")
    return summary
