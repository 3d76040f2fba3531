"""One training run: data, gated model, SGD, the pruner, evaluation of the deterministic network.

Layout follows torchvision's references: `train_one_epoch`, `evaluate`, `run(cfg, out_dir)`.
"""

from __future__ import annotations

import json
import math
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from cap.arch import architecture
from cap.bn import recalibrate_bn
from cap.config import Config, to_dict
from cap.data import build_data
from cap.models import create_model
from cap.pruner import Pruner


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    t = cfg.train
    if t.schedule == "cosine":
        def factor(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    elif t.schedule == "step":
        def factor(step: int) -> float:
            return t.step_gamma ** sum(step >= m * total_steps for m in t.milestones)
    else:
        def factor(step: int) -> float:
            return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model: nn.Module, pruner: Pruner, optimizer, scheduler, loader, device, steps: int,
                    desc: str, progress: bool) -> dict:
    model.train()
    total_loss, correct, seen, events = 0.0, 0, 0, []
    bar = tqdm(total=steps, desc=desc, leave=False, disable=not progress, file=sys.stderr)
    for step, (images, labels) in enumerate(loader):
        if step >= steps:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        pruner.before_forward()
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        events += pruner.after_step()
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        bar.update()
    bar.close()
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1), "events": events}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> dict:
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
    return {"test_loss": total_loss / seen, "test_acc": correct / seen}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.model.name}-{cfg.data.name}-tau{cfg.prune.tau:g}"


def model_kwargs(cfg: Config, data) -> dict:
    kwargs = {"num_classes": data.num_classes, "in_channels": data.in_channels, "input_size": data.input_size}
    if cfg.model.name in ("resnet20", "resnet32", "resnet56", "resnet110"):
        kwargs["width"] = cfg.model.width
    return kwargs


def run(cfg: Config, out_dir: Path | None = None, log=print) -> dict:
    """Train one model as configured; write config.yaml, summary.json, history.json and model.pt."""
    out_dir = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    data = build_data(cfg.data, cfg.seed)  # fails on bad data before any other work
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)

    kwargs = model_kwargs(cfg, data)
    model = create_model(cfg.model.name, **kwargs).to(device)
    t = cfg.train
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                                weight_decay=t.weight_decay)
    steps = len(data.train) if t.max_steps_per_epoch is None else min(len(data.train), t.max_steps_per_epoch)
    scheduler = make_scheduler(optimizer, cfg, steps * t.epochs)
    pruner = Pruner(model, cfg.prune, steps, t.epochs, optimizer)
    log(f"run {out_dir}: {cfg.model.name} on {data.name} ({data.train_size} train / {data.test_size} test), "
        f"tau={cfg.prune.tau:g} alpha={cfg.prune.alpha:g} beta={cfg.prune.beta:g}, {t.epochs} epochs "
        f"of {steps} steps, device {device}")

    history, epoch_seconds = [], []
    for epoch in range(t.epochs):
        start = time.perf_counter()
        result = train_one_epoch(model, pruner, optimizer, scheduler, data.train, device, steps,
                                 f"epoch {epoch + 1}/{t.epochs}", t.progress)
        events = result.pop("events") + pruner.end_epoch(epoch)
        epoch_seconds.append(time.perf_counter() - start)
        pruner.deterministic()
        recalibrate_bn(model, data.calib(cfg.prune.bn_batches), device)
        result.update(evaluate(model, data.test, device))
        stats = pruner.stats()
        record = {"epoch": epoch + 1, **result, **stats, "epoch_seconds": epoch_seconds[-1],
                  "blocks_removed": sum(e.kind == "block" for e in events), "hardened": pruner.state.hardened}
        history.append(record)
        log(f"epoch {epoch + 1}/{t.epochs} loss {result['train_loss']:.3f} test_acc {result['test_acc']:.4f} "
            f"MACs {stats['mac_ratio']:.3f} params {stats['param_ratio']:.3f} "
            f"blocks {stats['layers_kept']}/{stats['layers_total']} units {stats['units_kept']}/{stats['units_total']} "
            f"undecided {stats['theta_undecided']}{' hardened' if pruner.enabled and pruner.state.hardened else ''} "
            f"({epoch_seconds[-1]:.1f}s)")

    final = history[-1]
    summary = {
        "test_acc": final["test_acc"], "test_loss": final["test_loss"], "train_loss": final["train_loss"],
        **pruner.stats(),
        "epoch_seconds": epoch_seconds, "train_seconds": sum(epoch_seconds),
        "peak_memory_mb": peak_memory_mb(device),
        "tau": cfg.prune.tau, "alpha": cfg.prune.alpha, "beta": cfg.prune.beta,
        "dataset": data.name, "model": cfg.model.name, "epochs": t.epochs, "seed": cfg.seed,
        "steps_per_epoch": steps, "hardened_at_step": pruner.state.harden_step,
        "theta_undecided_at_harden": pruner.state.undecided_at_harden,
        "prune_events": [vars(e) for e in pruner.state.events],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    torch.save({"arch": architecture(model, cfg.model.name, kwargs), "state_dict": model.state_dict()},
               out_dir / "model.pt")
    log(f"done: test_acc {summary['test_acc']:.4f}, MAC reduction {1 - summary['mac_ratio']:.1%}, "
        f"param reduction {1 - summary['param_ratio']:.1%}, blocks kept {summary['layers_kept']}/"
        f"{summary['layers_total']}, units kept {summary['units_kept']}/{summary['units_total']}; {out_dir}")
    return summary
