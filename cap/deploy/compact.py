"""The compact model: a trained gated ResNet turned into plain conv/BN/ReLU/linear layers, and back from disk.

`compact_from_gated(model)` removes every structure the deterministic network switches off (units with
theta < 0.5, blocks whose layer theta < 0.5; nothing when the run hardened) and rebuilds the net from
standard modules: stem, then per block position either `PlainBlock` (relu(shortcut(x) + branch(x)),
branch = conv-BN-ReLU-...-conv-BN) or `ShortcutBlock` (relu(shortcut(x)) where the block was removed),
mean pooling, linear. No gate code is left. cap.deploy.export writes arch.json (the surviving structure)
with the weights as a state_dict, TorchScript or ONNX; `load_compact(dir)` rebuilds the module from
arch.json and loads the state_dict with weights_only=True (no module is unpickled).

`round_to=k` pads every kept internal width up to a multiple of k (tensor-core friendly shapes) with
zero channels whose BN scale and shift are 0: the outputs are unchanged (no accuracy cost), MACs and
parameters grow, and arch.json records both counts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cap.core.arch import deterministic_architecture, drop_switched_off
from cap.core.blocks import GatedBlock, OptionAShortcut
from cap.core.gates import gates_of, set_gate_mode
from cap.models import ArchitectureError, build_from_architecture, load_trained

FORMAT = "cap-compact-1"


class ExportError(ValueError):
    """A run folder, arch.json or weights file cannot give a compact model; the message says what is wrong."""


class PlainBlock(nn.Module):
    def __init__(self, branch: nn.Sequential, shortcut: nn.Module) -> None:
        super().__init__()
        self.branch, self.shortcut = branch, shortcut

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.shortcut(x) + self.branch(x))


class ShortcutBlock(nn.Module):
    """A removed block: only its shortcut is left.

    The gated network computes relu(shortcut(x)). A block's input is always a ReLU output (the stem and
    every block end in one), and the identity and option-A shortcuts (subsample, zero-pad) keep x >= 0, so
    for them the ReLU is a no-op and is left out: a removed identity block costs nothing at inference."""

    def __init__(self, shortcut: nn.Module) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.needs_relu = not isinstance(shortcut, (nn.Identity, OptionAShortcut))

    def forward(self, x: Tensor) -> Tensor:
        y = self.shortcut(x)
        return F.relu(y) if self.needs_relu else y


class CompactResNet(nn.Module):
    def __init__(self, stem: nn.Module, blocks: list[nn.Module], fc: nn.Linear) -> None:
        super().__init__()
        self.stem, self.blocks, self.fc = stem, nn.Sequential(*blocks), fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def _pad_widths(block: GatedBlock, multiple: int) -> None:
    """Grow each internal width to a multiple of `multiple` with channels that always output zero."""
    stages = block.stages()
    for i, (conv, bn, gate) in enumerate(stages[:-1]):
        extra = -conv.out_channels % multiple
        if not extra:
            continue
        nxt = stages[i + 1][0]
        with torch.no_grad():
            conv.weight = nn.Parameter(torch.cat([conv.weight, conv.weight.new_zeros(extra, *conv.weight.shape[1:])]))
            nxt.weight = nn.Parameter(torch.cat([nxt.weight, nxt.weight.new_zeros(nxt.weight.shape[0], extra,
                                                                                   *nxt.weight.shape[2:])], 1))
            bn.weight = nn.Parameter(torch.cat([bn.weight, bn.weight.new_zeros(extra)]))
            bn.bias = nn.Parameter(torch.cat([bn.bias, bn.bias.new_zeros(extra)]))
            bn.running_mean = torch.cat([bn.running_mean, bn.running_mean.new_zeros(extra)])
            bn.running_var = torch.cat([bn.running_var, bn.running_var.new_ones(extra)])
            gate.theta = torch.cat([gate.theta, gate.theta.new_ones(extra)])
            gate.locked = torch.cat([gate.locked, gate.locked.new_ones(extra)])
        conv.out_channels += extra
        nxt.in_channels += extra
        bn.num_features += extra


def compact_from_gated(model: nn.Module, round_to: int | None = None) -> CompactResNet:
    """A plain copy of `model`'s deterministic network (the gated model itself is left untouched)."""
    model = copy.deepcopy(model).eval()
    drop_switched_off(model)
    plain: list[nn.Module] = []
    for _, _, block in model.block_slots():
        if block.is_removed:
            plain.append(ShortcutBlock(block.shortcut))
            continue
        if round_to:
            _pad_widths(block, round_to)
        layers: list[nn.Module] = []
        for conv, bn, gate in block.stages():
            layers += [conv, bn] + ([nn.ReLU()] if gate is not None else [])
        plain.append(PlainBlock(nn.Sequential(*layers), block.shortcut))
    return CompactResNet(model.stem, plain, model.fc).eval()


def compact_architecture(model: nn.Module, name: str, kwargs: dict, round_to: int | None) -> dict[str, Any]:
    """arch.json: the structure of the deterministic network after the same removals (and padding)."""
    arch = deterministic_architecture(model, name, kwargs)
    for entry in arch["blocks"]:
        if round_to and not entry["removed"]:
            entry["widths"] = [w + (-w % round_to) for w in entry["widths"]]
    return {"format": FORMAT, "round_to": round_to, **arch}


def _gated_skeleton(arch: dict[str, Any]) -> nn.Module:
    """The gated model with arch's widths (padded widths may exceed none of the dense ones)."""
    try:
        return build_from_architecture({k: arch[k] for k in ("name", "kwargs", "blocks")})
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"arch.json does not describe a model cap can build: {exc}") from exc


def build_compact(arch: dict[str, Any]) -> CompactResNet:
    """An untrained CompactResNet of the structure in `arch` (as written by `export`)."""
    found = arch.get("format") if isinstance(arch, dict) else arch
    if found != FORMAT:
        raise ExportError(f"arch.json: 'format' must be {FORMAT!r}, got {found!r}")
    skeleton = _gated_skeleton(arch)
    for gate in gates_of(skeleton):  # every structure of the skeleton is kept: all thetas 1 already
        gate.theta.fill_(1.0)
    set_gate_mode(skeleton, "deterministic")
    return compact_from_gated(skeleton)


def count_macs_params(model: nn.Module, input_size: int, in_channels: int) -> tuple[int, int]:
    """MACs of one image (torch's FlopCounterMode counts 2 FLOPs per MAC) and the parameter count."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_channels, input_size, input_size))
    return counter.get_total_flops() // 2, sum(p.numel() for p in model.parameters())


def load_run_model(run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trained gated model of a run folder, in deterministic mode, and its architecture."""
    try:
        return load_trained(run_dir)
    except ArchitectureError as exc:
        raise ExportError(f"{exc} (export needs a finished run folder)") from exc


def load_compact(path: str | Path) -> CompactResNet:
    """Rebuild an exported compact model from DIR/arch.json and DIR/model.pt (weights_only: no unpickling)."""
    folder = Path(path)
    folder = folder if folder.is_dir() else folder.parent
    try:
        arch = json.loads((folder / "arch.json").read_text())
    except FileNotFoundError as exc:
        raise ExportError(f"{folder}/arch.json does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ExportError(f"{folder}/arch.json is not valid JSON: {exc}") from exc
    model = build_compact(arch)
    try:
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except FileNotFoundError as exc:
        raise ExportError(f"{folder}/model.pt does not exist") from exc
    except RuntimeError as exc:
        raise ExportError(f"{folder}/model.pt does not fit {folder}/arch.json: {str(exc).splitlines()[0]} "
                          f"{' '.join(str(exc).split()[1:12])} ...") from exc
    return model.eval()
