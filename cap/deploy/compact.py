"""The compact model: a trained gated ResNet turned into plain conv/BN/ReLU/linear layers, and back from disk.

`compact_from_gated(model)` removes every structure the deterministic network switches off (units with
theta < 0.5, blocks whose layer theta < 0.5; nothing when the run hardened) and rebuilds the net from
standard modules: stem, then per block position either `PlainBlock` (relu(shortcut(x) + branch(x)),
branch = conv-BN-ReLU-...-conv-BN) or `ShortcutBlock` (relu(shortcut(x)) where the block was removed),
mean pooling, linear. No gate code is left; option-A shortcuts become `ZeroPadShortcut` (the same zeros,
built with torch.cat so that graph tools such as Torch-Pruning can map its channels). cap.deploy.export
writes arch.json (the surviving structure) with the weights as a state_dict, TorchScript, ONNX or an
ExportedProgram; `load_compact(dir)` rebuilds the module from arch.json and loads the state_dict with
weights_only=True (no module is unpickled).

`round_to=k` pads every kept internal width up to a multiple of k (tensor-core friendly shapes) with
zero channels whose BN scale and shift are 0: the outputs are unchanged (no accuracy cost), MACs and
parameters grow, and arch.json records both counts.
"""

from __future__ import annotations

import copy
import json
import pickle
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


class ZeroPadShortcut(nn.Module):
    """The option-A shortcut (subsample by `stride`, zero channels before and after) as graph tools read it.

    cap.core.blocks.OptionAShortcut pads with F.pad, which Torch-Pruning treats as element-wise: it chains
    every stage's residual stream into one group and fails (IndexError). Here the zeros are parameters
    concatenated with torch.cat, so a tool maps each output channel to an input channel or to a zero it can
    drop. The outputs are bit-for-bit those of F.pad. The zeros are constants of the method, not learned:
    count_macs_params does not count them, and they should be frozen if the exported model is fine-tuned."""

    def __init__(self, stride: int, front: int, back: int) -> None:
        super().__init__()
        self.stride = stride
        self.zeros_front = nn.Parameter(torch.zeros(1, front, 1, 1))
        self.zeros_back = nn.Parameter(torch.zeros(1, back, 1, 1))

    @classmethod
    def from_option_a(cls, shortcut: OptionAShortcut) -> ZeroPadShortcut:
        return cls(shortcut.stride, shortcut.pad // 2, shortcut.pad - shortcut.pad // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        n, _, h, w = x.shape
        return torch.cat([self.zeros_front.expand(n, -1, h, w), x, self.zeros_back.expand(n, -1, h, w)], 1)


def _plain_shortcut(shortcut: nn.Module, device: torch.device) -> nn.Module:
    return ZeroPadShortcut.from_option_a(shortcut).to(device) if isinstance(shortcut, OptionAShortcut) else shortcut


class PlainBlock(nn.Module):
    def __init__(self, branch: nn.Sequential, shortcut: nn.Module) -> None:
        super().__init__()
        self.branch, self.shortcut = branch, shortcut

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.shortcut(x) + self.branch(x))


class ShortcutBlock(nn.Module):
    """A removed block: only its shortcut is left.

    The gated network computes relu(shortcut(x)). A block's input is always a ReLU output (the stem and
    every block end in one), and the identity and zero-pad shortcuts (subsample, zero-pad) keep x >= 0, so
    for them the ReLU is a no-op and is left out: a removed identity block costs nothing at inference."""

    def __init__(self, shortcut: nn.Module) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.needs_relu = not isinstance(shortcut, (nn.Identity, ZeroPadShortcut))

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
    device = model.fc.weight.device
    plain: list[nn.Module] = []
    for _, _, block in model.block_slots():
        if block.is_removed:
            plain.append(ShortcutBlock(_plain_shortcut(block.shortcut, device)))
            continue
        if round_to:
            _pad_widths(block, round_to)
        layers: list[nn.Module] = []
        for conv, bn, gate in block.stages():
            layers += [conv, bn] + ([nn.ReLU()] if gate is not None else [])
        plain.append(PlainBlock(nn.Sequential(*layers), _plain_shortcut(block.shortcut, device)))
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
    """MACs of one image (torch's FlopCounterMode counts 2 FLOPs per MAC) and the parameter count (without
    the constant zeros of ZeroPadShortcut, as training counts the option-A shortcut: no parameters)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_channels, input_size, input_size))
    zeros = {id(p) for m in model.modules() if isinstance(m, ZeroPadShortcut) for p in m.parameters()}
    return counter.get_total_flops() // 2, sum(p.numel() for p in model.parameters() if id(p) not in zeros)


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
    except FileNotFoundError as exc:
        raise ExportError(f"{folder}/model.pt does not exist") from exc
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise ExportError(f"{folder}/model.pt is not a readable state_dict ({str(exc).splitlines()[0]}); "
                          "export the run again") from exc
    if not isinstance(state, dict):
        raise ExportError(f"{folder}/model.pt holds a {type(state).__name__}, not a state_dict; export the run again")
    for name, zeros in model.state_dict().items():  # exports written before ZeroPadShortcut lack its zeros
        if ".zeros_" in name:
            state.setdefault(name, zeros)
    mismatch = _state_mismatch(model.state_dict(), state)
    if mismatch:
        raise ExportError(f"{folder}/model.pt does not fit {folder}/arch.json: {mismatch}")
    model.load_state_dict(state)
    return model.eval()


def _state_mismatch(want: dict[str, Tensor], got: dict[str, Any]) -> str | None:
    """The first difference between the state_dict a structure needs and the one a file holds, in one line."""
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shapes = [k for k in want if k in got and (not isinstance(got[k], Tensor) or got[k].shape != want[k].shape)]

    def more(names: list[str]) -> str:
        return f" (and {len(names) - 1} more)" if len(names) > 1 else ""

    if shapes:
        k = shapes[0]
        found = list(got[k].shape) if isinstance(got[k], Tensor) else type(got[k]).__name__
        return f"{k} is {found} in the file, the structure needs {list(want[k].shape)}{more(shapes)}"
    if missing:
        return f"the file lacks {missing[0]}{more(missing)}"
    if extra:
        return f"the file has {extra[0]}, which the structure does not{more(extra)}"
    return None
