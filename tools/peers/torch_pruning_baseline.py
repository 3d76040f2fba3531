"""Peer baseline: Torch-Pruning (torch-pruning==1.6.1) one-shot group-L1 pruning of the SAME plain ResNet.

Recipe (the standard Torch-Pruning one, on cap's model, data, optimiser and epoch budget):
  1. cfg from a YAML + `key=value` overrides exactly like `cap train`; data from cap.data.build_data; the
     model from cap.models.create_model with every gate in mode "dense", i.e. a plain ResNet.
  2. Train dense with cap's SGD recipe (nesterov, momentum, weight decay) on the global schedule of
     cap.engine.loop.make_scheduler over ALL epochs (total steps = steps_per_epoch * epochs), with the
     engine's own epoch (cap.engine.loop.train_one_epoch without a pruner: cap's step without gates), for
     round(prune_at * epochs) epochs.
  3. Prune once: tp.pruner.MetaPruner (MagnitudePruner is the same class in 1.6.1) with
     tp.importance.GroupMagnitudeImportance(p=1) (group L1), global_pruning=False, one uniform
     pruning_ratio found by bisection so that the MACs land as close as they can to
     target_mac_ratio * dense MACs; fc ignored (its class outputs are never pruned).
  4. A fresh SGD (momentum buffers reset, the usual Torch-Pruning practice after structural pruning)
     fine-tunes for the remaining epochs on the schedule cap uses after hardening: with train.lr_rewind
     (the config's, 0 by default) a replay of the schedule from that point, else the continuing one.
  Evaluation after every epoch: eval mode with the model's own BN running statistics (no re-estimation).

What Torch-Pruning 1.6.1 can and cannot trace on cap's CIFAR ResNets:
  * cap's Gate modules are the identity in mode "dense" (they return their input), so they leave no
    autograd node and TP never sees them. TP does not resize their `theta` buffers; this script does
    (to the pruned channel counts), so cap.core.complexity.expected_cost stays valid for the pruned net.
  * The option-A shortcut (subsample, then F.pad on the channel dimension) is NOT understood: TP treats
    ConstantPadNdBackward as an element-wise op, chains the residual streams of all three stages (16, 32
    and 64 channels) into ONE 64-index group, and `pruner.step()` fails with "IndexError: index 32 is out
    of bounds for dimension 0 with size 32" at any ratio.
  * Fix used here: each OptionAShortcut is swapped for a functionally identical ChannelMapShortcut
    (subsample, then gather channels through an index map in which -1 is a zero channel), registered
    with TP as a customised layer whose input and output channels are pruned independently, like a
    parameter-free 1x1 conv with 0/1 weights. An output channel whose source input channel was pruned
    becomes a zero (padding) channel. With that, TP traces the network correctly: one group per residual
    stream (stem/bn2 outputs, conv1 inputs, shortcut outputs/inputs, fc inputs for the last stage) and
    one internal group per block (conv1 outputs -> bn1 -> conv2 inputs).
  * So this baseline prunes ALL coupled groups at one uniform ratio: the INTERNAL channels of every block
    (conv1 outputs: what cap's unit gates prune) AND the residual-stream channels of every stage (which
    cap does not prune). It never removes whole blocks (Torch-Pruning prunes width only).

MACs: dense and final MACs are counted with torch.utils.flop_counter.FlopCounterMode (FLOPs / 2) on one
image, independently of cap's counter; cap.core.complexity.expected_cost is reported beside them as a check
(`macs_final_cap`). Conv and linear layers only, as in cap (the shortcut gather costs no MACs).

peak_memory_mb is cap.engine.run.peak_memory_mb: resource.getrusage ru_maxrss / 1024 on CPU (a process-lifetime
peak: a run called in-process after other work inherits that work's peak), torch's allocator peak on CUDA.

    python tools/peers/torch_pruning_baseline.py --config configs/fmnist_resnet20.yaml \\
        --target-mac-ratio 0.5 --prune-at 0.5 --out runs/tp-r20 [key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp
import yaml
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from cap.core.blocks import OptionAShortcut
from cap.core.complexity import count_params, expected_cost
from cap.core.gates import set_gate_mode
from cap.data import build_data
from cap.engine.config import Config, ConfigError, load_config, to_dict
from cap.engine.loop import averages, evaluate, make_scheduler, new_meter, train_one_epoch
from cap.engine.run import peak_memory_mb, pick_device
from cap.engine.state import model_kwargs, seed_everything
from cap.models import create_model

METHOD = "torch-pruning"
TP_VERSION = importlib.metadata.version("torch-pruning")  # tp.__version__ of 1.6.1 still says "1.6.0"
PRUNED = ("all coupled groups at one ratio: block-internal channels (outputs of every block conv but the last, "
          "as cap's unit gates) and residual-stream channels (not pruned by cap)")
MAX_PRUNING_RATIO = 0.9
"""upper end of the bisection: every layer keeps at least int(n * 0.1) >= 1 channel for n >= 10"""


class PeerError(ValueError):
    """A bad argument of the baseline (target, prune_at) or an unreachable MAC target."""


class ChannelMapShortcut(nn.Module):
    """Option-A shortcut generalised: out[:, j] = x[:, src[j], ::stride, ::stride], or 0 where src[j] == -1.

    Built from an OptionAShortcut it computes exactly the same thing (the padded channels are src = -1)."""

    def __init__(self, stride: int, in_channels: int, src: Sequence[int]) -> None:
        super().__init__()
        self.stride, self.in_channels = stride, in_channels
        self.register_buffer("index", torch.as_tensor(list(src), dtype=torch.long) + 1)  # 0: the zero channel

    @classmethod
    def from_option_a(cls, shortcut: OptionAShortcut, in_channels: int) -> ChannelMapShortcut:
        front = shortcut.pad // 2
        src = [-1] * front + list(range(in_channels)) + [-1] * (shortcut.pad - front)
        return cls(shortcut.stride, in_channels, src)

    @property
    def out_channels(self) -> int:
        return self.index.numel()

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        x = F.pad(x, (0, 0, 0, 0, 1, 0))  # channel 0 is zeros
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, in_channels={self.in_channels}, out_channels={self.out_channels}"


class ChannelMapPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning handler for ChannelMapShortcut: input and output channels are pruned independently
    (prune_in_channels is not prune_out_channels, so TP adds no intra-layer dependency)."""

    TARGET_MODULES = ChannelMapShortcut

    def prune_out_channels(self, layer: ChannelMapShortcut, idxs: Sequence[int]) -> ChannelMapShortcut:
        drop = set(int(i) for i in idxs)
        keep = [j for j in range(layer.out_channels) if j not in drop]
        layer.index = layer.index[torch.as_tensor(keep, dtype=torch.long, device=layer.index.device)]
        return layer

    def prune_in_channels(self, layer: ChannelMapShortcut, idxs: Sequence[int]) -> ChannelMapShortcut:
        drop = set(int(i) for i in idxs)
        new_pos, kept = {}, 0
        for i in range(layer.in_channels):
            if i not in drop:
                new_pos[i] = kept
                kept += 1
        src = [new_pos.get(s, -1) if s >= 0 else -1 for s in (layer.index - 1).tolist()]
        layer.index = torch.as_tensor(src, dtype=torch.long, device=layer.index.device) + 1
        layer.in_channels = kept
        return layer

    def get_out_channels(self, layer: ChannelMapShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ChannelMapShortcut) -> int:
        return layer.in_channels


def make_tp_compatible(model: nn.Module) -> int:
    """Gates to "dense" and every OptionAShortcut swapped for an equivalent ChannelMapShortcut; returns the
    number of shortcuts swapped."""
    set_gate_mode(model, "dense")
    swapped = 0
    for block in model.blocks():
        if isinstance(block.shortcut, OptionAShortcut):
            block.shortcut = ChannelMapShortcut.from_option_a(block.shortcut, block.conv1.in_channels).to(
                block.conv1.weight.device)
            swapped += 1
    return swapped


def sync_gates(model: nn.Module) -> None:
    """Resize each unit gate's theta to its conv's (pruned) output channels; TP does not see the gates."""
    for block in model.blocks():
        for conv, _bn, gate in block.stages():
            if gate is not None and gate.size != conv.out_channels:
                gate.theta = torch.ones(conv.out_channels, dtype=gate.theta.dtype, device=gate.theta.device)


def count_macs(model: nn.Module) -> int:
    """MACs of one image (FLOPs / 2 of conv and linear layers), by torch.utils.flop_counter."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, model.in_channels, model.input_size, model.input_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def build_pruner(model: nn.Module, ratio: float) -> tp.pruner.MetaPruner:
    device = next(model.parameters()).device
    example = torch.zeros(1, model.in_channels, model.input_size, model.input_size, device=device)
    was_training = model.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.GroupMagnitudeImportance(p=1), global_pruning=False,
            pruning_ratio=ratio, ignored_layers=[model.fc],
            customized_pruners={ChannelMapShortcut: ChannelMapPruner()})
    model.train(was_training)  # tracing leaves the model in eval mode
    return pruner


def prune(model: nn.Module, ratio: float) -> nn.Module:
    """Prune `model` in place at a uniform `ratio` of every coupled group (one step); returns it."""
    if ratio > 0:
        build_pruner(model, ratio).step()
        sync_gates(model)
    return model


def find_ratio(model: nn.Module, target_macs: float, iters: int = 24) -> tuple[float, nn.Module, int]:
    """Bisection on the uniform pruning ratio. MACs(ratio) is a non-increasing step function (channel counts
    are integers), so the search brackets the target between two neighbouring achievable MAC counts and
    returns the ratio whose MACs are closest to the target, a pruned copy of `model` at it, and its MACs."""
    cache: dict[float, int] = {}

    def trial(ratio: float) -> int:
        if ratio not in cache:
            cache[ratio] = count_macs(prune(copy.deepcopy(model), ratio))
        return cache[ratio]

    lo, hi = 0.0, MAX_PRUNING_RATIO  # invariant: MACs(lo) >= target >= MACs(hi)
    if trial(lo) <= target_macs:
        hi = lo
    elif trial(hi) > target_macs:
        raise PeerError(f"target of {target_macs:.0f} MACs is below what pruning ratio {MAX_PRUNING_RATIO} "
                        f"reaches ({trial(hi)} MACs)")
    for _ in range(iters):
        if hi - lo < 1e-6:
            break
        mid = (lo + hi) / 2
        if trial(mid) >= target_macs:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda r: (abs(trial(r) - target_macs), r))
    pruned = prune(copy.deepcopy(model), best)  # pruning is deterministic: the same net as the trial's
    macs = count_macs(pruned)
    assert macs == cache[best], (macs, cache[best])
    return best, pruned, macs


def widths(model: nn.Module) -> list[list[int]]:
    """[input, internal, output] channels of every block's convs, in forward order."""
    return [[b.conv1.in_channels, *(conv.out_channels for conv, _, _ in b.stages())] for b in model.blocks()]


def internal_units(model: nn.Module) -> int:
    """Channels cap's unit gates act on: the outputs of every block conv but the last."""
    return sum(conv.out_channels for b in model.blocks() for conv, _, gate in b.stages() if gate is not None)


def train_epoch(model: nn.Module, optimizer, scheduler, loader, device, steps: int, desc: str,
                progress: bool) -> dict:
    """Plain training: the engine's epoch (cap.engine.loop.train_one_epoch) without a pruner, AMP, clipping
    or DDP, i.e. SGD step, then the per-step schedule, loss and accuracy read each step."""
    meter = new_meter()
    train_one_epoch(model, optimizer, scheduler, loader, device, steps=steps, meter=meter, desc=desc,
                    progress=progress)
    result = averages(meter)
    if meter["nonfinite_steps"]:  # the engine averages finite losses only; a diverged baseline must show
        result["train_loss"] = math.nan
    return result


def check_arguments(target_mac_ratio: float, prune_at: float) -> None:
    if not 0 < target_mac_ratio <= 1:
        raise PeerError(f"target_mac_ratio must be in (0, 1], got {target_mac_ratio}")
    if not 0 <= prune_at <= 1:
        raise PeerError(f"prune_at must be in [0, 1], got {prune_at}")


def run_torch_pruning(cfg: Config, target_mac_ratio: float, prune_at: float, out_dir: str | Path | None = None,
                      log: Callable[[str], None] = print) -> dict:
    """Train, prune once with Torch-Pruning at round(prune_at * epochs) epochs, fine-tune; return the summary
    (also written to out_dir/summary.json with config.yaml and history.json when out_dir is given)."""
    check_arguments(target_mac_ratio, prune_at)
    data = build_data(cfg.data, cfg.seed)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(
            {**to_dict(cfg), "peer": {"method": METHOD, "target_mac_ratio": target_mac_ratio,
                                      "prune_at": prune_at}}, sort_keys=False))
    seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)

    model = create_model(cfg.model.name, **model_kwargs(cfg, data))
    dense_cap = expected_cost(model)
    swapped = make_tp_compatible(model)
    model.to(device)
    macs_dense, params_dense = count_macs(model), count_params(model)
    units_total = internal_units(model)
    # MACs(ratio) depends on channel counts only, not on weights: check reachability before training.
    floor = count_macs(prune(copy.deepcopy(model), MAX_PRUNING_RATIO))
    if target_mac_ratio * macs_dense < floor:
        raise PeerError(f"target_mac_ratio {target_mac_ratio:g} is below {floor / macs_dense:.4f}, what pruning "
                        f"ratio {MAX_PRUNING_RATIO} reaches on {cfg.model.name}")

    t = cfg.train

    def new_optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                               weight_decay=t.weight_decay)

    steps = len(data.train) if t.max_steps_per_epoch is None else min(len(data.train), t.max_steps_per_epoch)
    total_steps = steps * t.epochs
    optimizer = new_optimizer()
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    prune_epoch = round(prune_at * t.epochs)
    log(f"{METHOD}: {cfg.model.name} on {data.name} ({data.train_size} train / {data.test_size} test), "
        f"{t.epochs} epochs of {steps} steps, prune once after epoch {prune_epoch} to "
        f"{target_mac_ratio:g} of {macs_dense} MACs, device {device}; {swapped} option-A shortcuts mapped "
        f"for Torch-Pruning {TP_VERSION}; prunes {PRUNED}")

    info: dict = {}

    def prune_now(done_steps: int) -> float:
        """Prune the model (bisection on the ratio), rebuild optimiser and schedule; returns seconds taken."""
        nonlocal model, optimizer, scheduler
        start = time.perf_counter()
        ratio, pruned, macs = find_ratio(model, target_mac_ratio * macs_dense)
        model = pruned
        optimizer = new_optimizer()  # fresh SGD: momentum buffers reset
        scheduler = make_scheduler(optimizer, cfg, total_steps, hardened_at=lambda: done_steps)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": fast-forwarding on purpose
            warnings.simplefilter("ignore")
            for _ in range(done_steps):
                scheduler.step()
        seconds = time.perf_counter() - start
        if abs(macs / macs_dense / target_mac_ratio - 1) > 0.01:
            log(f"warning: the closest MAC ratio a uniform pruning ratio reaches is {macs / macs_dense:.4f}, "
                f"{macs / macs_dense / target_mac_ratio - 1:+.1%} off the target {target_mac_ratio:g} "
                "(channel counts are integers, so MACs(ratio) is a step function)")
        info.update(pruning_ratio=ratio, prune_step=done_steps, prune_seconds=seconds, macs_after_prune=macs)
        log(f"pruned after {done_steps} steps: uniform ratio {ratio:.4f} -> {macs} MACs "
            f"({macs / macs_dense:.4f} of dense, target {target_mac_ratio:g}), lr {optimizer.param_groups[0]['lr']:.4g}"
            f" ({seconds:.1f}s)")
        return seconds

    history, epoch_seconds = [], []
    extra = prune_now(0) if prune_epoch == 0 else 0.0
    for epoch in range(t.epochs):
        start = time.perf_counter()
        result = train_epoch(model, optimizer, scheduler, data.train, device, steps, f"epoch {epoch + 1}/{t.epochs}",
                             t.progress)
        pruned_now = epoch + 1 == prune_epoch and prune_epoch > 0
        if pruned_now:
            extra += prune_now((epoch + 1) * steps)
        epoch_seconds.append(time.perf_counter() - start + extra)  # the pruning step counts in its epoch
        extra = 0.0
        result.update(evaluate(model, data.test, device))
        macs, params = count_macs(model), count_params(model)
        record = {"epoch": epoch + 1, **result, "mac_ratio": macs / macs_dense, "param_ratio": params / params_dense,
                  "macs": macs, "params": params, "epoch_seconds": epoch_seconds[-1], "pruned": pruned_now}
        history.append(record)
        log(f"epoch {epoch + 1}/{t.epochs} loss {result['train_loss']:.3f} test_acc {result['test_acc']:.4f} "
            f"MACs {record['mac_ratio']:.3f} params {record['param_ratio']:.3f}"
            f"{' pruned' if pruned_now else ''} ({epoch_seconds[-1]:.1f}s)")

    final = history[-1]
    macs_final, params_final = count_macs(model), count_params(model)
    cap_final = expected_cost(model)
    summary = {
        "test_acc": final["test_acc"], "test_loss": final["test_loss"], "train_loss": final["train_loss"],
        "macs_dense": macs_dense, "macs_final": macs_final, "params_dense": params_dense,
        "params_final": params_final, "mac_ratio": macs_final / macs_dense, "param_ratio": params_final / params_dense,
        "macs_dense_cap": int(round(float(dense_cap.macs))), "macs_final_cap": int(round(float(cap_final.macs))),
        "layers_total": len(list(model.blocks())), "layers_kept": len(list(model.blocks())),
        "units_total": units_total, "units_kept": internal_units(model),
        "block_widths": widths(model),
        "epoch_seconds": epoch_seconds, "train_seconds": sum(epoch_seconds),
        "peak_memory_mb": peak_memory_mb(device),
        "dataset": data.name, "model": cfg.model.name, "epochs": t.epochs, "seed": cfg.seed,
        "method": METHOD, "prune_at": prune_at, "prune_epoch": prune_epoch, "target_mac_ratio": target_mac_ratio,
        "pruned_structures": PRUNED, "torch_pruning_version": TP_VERSION, **info,
    }
    if out_dir is not None:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    log(f"done: test_acc {summary['test_acc']:.4f}, MAC ratio {summary['mac_ratio']:.4f} "
        f"(target {target_mac_ratio:g}), param ratio {summary['param_ratio']:.4f}, units kept "
        f"{summary['units_kept']}/{summary['units_total']}{'; ' + str(out_dir) if out_dir is not None else ''}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Torch-Pruning peer baseline: train dense, prune once (group L1, uniform ratio to a MAC "
                    "target), fine-tune; same model, data, optimiser and epochs as `cap train`.")
    parser.add_argument("--config", help="experiment YAML, as for `cap train` (defaults apply without it)")
    parser.add_argument("--target-mac-ratio", type=float, required=True,
                        help="fraction of the dense MACs to keep, e.g. 0.5")
    parser.add_argument("--prune-at", type=float, default=0.5,
                        help="prune after round(prune_at * train.epochs) epochs (default 0.5)")
    parser.add_argument("--out", help="run folder for summary.json, history.json, config.yaml "
                                      "(default: runs/<time>-<model>-<data>-torch-pruning)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.epochs=2 data.train_subset=512")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cap.data import DataError

    try:
        cfg = load_config(args.config, args.overrides)
        out = args.out
        if out is None:
            out = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.name}-{cfg.data.name}-{METHOD}"
        run_torch_pruning(cfg, args.target_mac_ratio, args.prune_at, out)
    except (ConfigError, DataError, PeerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
