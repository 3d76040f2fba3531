"""The training loop as flat functions: one step, one epoch, evaluation, the epoch line.

Everything a step touches is passed in (model, optimiser, schedule, scaler, pruner, loader, device), in
the manner of torchvision's references/classification/train.py, so that other training code (the
Torch-Pruning peer baseline) runs the very same steps: without a pruner and with the defaults (no AMP,
no clipping, no DDP) `train_one_epoch` is plain SGD training. The running sums of an epoch are kept in
a plain dict, the meter (`new_meter`), which a checkpoint stores as it is.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

if TYPE_CHECKING:
    from cap.core.pruner import Pruner
    from cap.engine.config import Config
    from cap.engine.distributed import DistContext

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

EPOCH_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "mac_ratio", "param_ratio", "layers_kept",
                 "units_kept", "theta_undecided", "theta_locked", "tau_now", "epoch_seconds")
"""the per-epoch values a tracker records"""


def new_meter() -> dict[str, float]:
    """The running sums of one epoch: `loss_sum` over the `loss_seen` samples of steps with a finite loss,
    `correct` of `seen`, wall `seconds`, `blocks_removed` by surgery, `nonfinite_steps`."""
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0, "blocks_removed": 0, "nonfinite_steps": 0,
            "loss_seen": 0}


def averages(meter: dict[str, float]) -> dict[str, float]:
    """Training loss (over the steps with a finite loss) and accuracy of a meter (or of sums over ranks)."""
    return {"train_loss": meter["loss_sum"] / max(meter["loss_seen"], 1),
            "train_acc": meter["correct"] / max(meter["seen"], 1)}


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int,
                   hardened_at: Callable[[], int | None] | None = None):
    """The per-step learning-rate schedule of `cfg.train` (cosine, step or constant, after a linear warm-up).

    With `train.lr_rewind` = r and `hardened_at` (the step the structure was fixed, or None before): from that
    step h on, the remaining steps replay the schedule's segment [r * total, total], stretched to fit
    (learning-rate rewinding, Renda et al. 2020)."""
    t = cfg.train
    shape = _schedule_shape(cfg, total_steps)
    warmup = round(t.lr_warmup_epochs * total_steps / t.epochs)

    def factor(step: int) -> float:
        h = hardened_at() if hardened_at is not None and t.lr_rewind is not None else None
        if h is not None and step >= h and total_steps > h:
            start = t.lr_rewind * total_steps
            return shape(start + (step - h) * (total_steps - start) / (total_steps - h))
        return shape(step) * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _schedule_shape(cfg: Config, total_steps: int) -> Callable[[float], float]:
    t = cfg.train
    if t.schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if t.schedule == "step":
        return lambda step: t.step_gamma ** sum(step >= m * total_steps for m in t.milestones)
    return lambda step: 1.0


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, images: torch.Tensor,
               labels: torch.Tensor, device: torch.device, meter: dict[str, float], *, ddp: nn.Module | None = None,
               scaler: torch.amp.GradScaler | None = None, pruner: Pruner | None = None,
               amp_dtype: torch.dtype | None = None, channels_last: bool = False,
               grad_clip: float | None = None) -> list:
    """One SGD step on a batch (forward through `ddp` where given, else `model`), then the per-step schedule
    and, with a pruner, its theta step and checks; adds to `meter`. Returns the pruner's surgery events:
    when there are any, parameters were replaced and a DDP wrapper must be rebuilt."""
    forward = model if ddp is None else ddp
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if pruner is not None:
        pruner.before_forward()
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = forward(images)
        loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:  # a disabled scaler is exactly loss.backward() and optimizer.step()
        scaler = torch.amp.GradScaler(device.type, enabled=False)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scale = float(scaler.get_scale()) if scaler.is_enabled() else 1.0
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    events = pruner.after_step(grad_scale=scale) if pruner is not None else []
    meter["blocks_removed"] += sum(e.kind == "block" for e in events)
    value = loss.item()
    if math.isfinite(value):
        meter["loss_sum"] += value * len(labels)
        meter["loss_seen"] += len(labels)
    else:  # fp16 overflows now and then (the scaler skips that step); a diverged run does it every step
        meter["nonfinite_steps"] += 1
    meter["correct"] += int((logits.argmax(1) == labels).sum())
    meter["seen"] += len(labels)
    return events


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loader: Iterable,
                    device: torch.device, *, steps: int, meter: dict[str, float], start: int = 0,
                    ddp: nn.Module | None = None, scaler: torch.amp.GradScaler | None = None,
                    pruner: Pruner | None = None, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                    grad_clip: float | None = None, on_surgery: Callable[[], nn.Module] | None = None,
                    after_step: Callable[[int], bool] | None = None, desc: str = "",
                    progress: bool = False) -> bool:
    """Steps `start` .. `steps - 1` of an epoch on batches drawn from `loader` (positioned by the caller: it
    yields the batch of step `start` first), in train mode; the running sums and seconds go into `meter`.

    `on_surgery()` runs after a step whose pruner changed the network and returns the module the next steps
    call (the rebuilt DDP wrapper). `after_step(n)` runs after step n - 1, with n the steps done in this
    epoch; when it returns True the epoch stops there. Returns True when it stopped early that way."""
    model.train()
    bar = tqdm(total=steps, initial=start, desc=desc, leave=False, disable=not progress, file=sys.stderr)
    batches = iter(loader)
    began = time.perf_counter()
    try:
        for done in range(start + 1, steps + 1):
            events = train_step(model, optimizer, scheduler, *next(batches), device, meter, ddp=ddp, scaler=scaler,
                                pruner=pruner, amp_dtype=amp_dtype, channels_last=channels_last, grad_clip=grad_clip)
            if events and on_surgery is not None:
                ddp = on_surgery()
            bar.set_postfix(loss=f"{meter['loss_sum'] / max(meter['loss_seen'], 1):.3f}")
            bar.update()
            if after_step is not None and after_step(done):
                return True
        return False
    finally:
        bar.close()
        meter["seconds"] += time.perf_counter() - began


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, ctx: DistContext | None = None,
             amp_dtype: torch.dtype | None = None) -> dict:
    """Loss and accuracy over `loader`; under data parallelism each rank scores its shard and the sums are
    all-reduced, so every test sample counts exactly once."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += len(labels)
    if ctx is not None:
        ctx.sum(totals)
    loss, correct, seen = totals.tolist()
    return {"test_loss": loss / seen, "test_acc": correct / seen, "test_seen": int(seen)}


def _target_part(record: dict[str, Any]) -> str:
    """With a budget target: the multiplier it has moved tau to."""
    if record.get("target_macs") is None and record.get("target_params") is None:
        return ""
    return f" tau {record['tau_now']:.3g}"


def epoch_line(record: dict[str, Any], epochs: int, hardened: bool) -> str:
    """The one line a finished epoch logs."""
    return (f"epoch {record['epoch']}/{epochs} loss {record['train_loss']:.3f} test_acc {record['test_acc']:.4f} "
            f"MACs {record['mac_ratio']:.3f} params {record['param_ratio']:.3f} "
            f"blocks {record['layers_kept']}/{record['layers_total']} units {record['units_kept']}/"
            f"{record['units_total']} undecided {record['theta_undecided']} locked {record['theta_locked']}"
            f"{_target_part(record)}{' hardened' if hardened else ''} "
            f"({record['epoch_seconds']:.1f}s)")
