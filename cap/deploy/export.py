"""`cap export`: a finished run folder's compact model written as a state_dict, TorchScript or ONNX, with arch.json.

An export never damages the one before it: everything is written to a temporary folder beside the target,
checked with `load_compact`, and only then moved into place (the old and the new folder swapped in one atomic
rename where the kernel offers it, else two renames). A failed export leaves the earlier one as it was.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path

import torch

from cap.deploy.compact import (
    ExportError,
    compact_architecture,
    compact_from_gated,
    count_macs_params,
    load_compact,
    load_run_model,
)

FORMATS = ("state_dict", "torchscript", "onnx", "exported_program")
EXPORT_FILES = ("arch.json", "model.pt", "model.ts", "model.onnx", "model.pt2")
"""what an export folder holds; a folder with anything else is not replaced"""


def export(run_dir: str | Path, out_dir: str | Path, fmt: str = "state_dict", round_to: int | None = None) -> Path:
    """Write out_dir/arch.json plus model.pt (state_dict), model.ts (TorchScript), model.onnx or model.pt2; an
    earlier export in out_dir is replaced whole, and only by one that loads back."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if round_to is not None and round_to < 1:
        raise ExportError(f"--round-to must be >= 1, got {round_to}")
    model, trained = load_run_model(Path(run_dir))
    out = Path(out_dir)
    _check_target(out)
    compact = compact_from_gated(model, round_to)
    arch = compact_architecture(model, trained["name"], trained["kwargs"], round_to)
    size, channels = trained["kwargs"]["input_size"], trained["kwargs"]["in_channels"]
    arch["macs"], arch["params"] = count_macs_params(compact, size, channels)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        name = _write(stage, compact, arch, fmt, torch.zeros(1, channels, size, size))
        _swap_into_place(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # a failed export's files, or the replaced export
    return out / name


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: give a folder for the export")
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES) if out.is_dir() else []
    if others:
        raise ExportError(f"--out {out} holds files that are not an export ({', '.join(others[:5])}): give a new "
                          "or empty folder (an earlier export folder is replaced whole)")


def _write(folder: Path, compact: torch.nn.Module, arch: dict, fmt: str, example: torch.Tensor) -> str:
    """The export files in `folder`, checked; returns the name of the model file of `fmt`."""
    (folder / "arch.json").write_text(json.dumps(arch, indent=2))
    torch.save(compact.state_dict(), folder / "model.pt")  # the weights always travel with arch.json
    load_compact(folder)  # what was written must load back (e.g. a width rounded past the dense width fails here)
    if fmt == "torchscript":
        torch.jit.save(torch.jit.trace(compact, example), folder / "model.ts")
        return "model.ts"
    if fmt == "onnx":
        torch.onnx.export(compact, (example,), str(folder / "model.onnx"), input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
        return "model.onnx"
    if fmt == "exported_program":  # torch.export, TorchScript's successor (torch.export.load reads it); dynamic batch
        program = torch.export.export(compact, (example.expand(2, *example.shape[1:]).contiguous(),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, folder / "model.pt2")
        return "model.pt2"
    return "model.pt"


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _swap_into_place(stage: Path, out: Path) -> None:
    """`stage` becomes `out`; an earlier `out` ends up at `stage` (removed by the caller)."""
    if not out.exists():
        os.rename(stage, out)
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        swapped = libc.renameat2(_AT_FDCWD, os.fsencode(stage), _AT_FDCWD, os.fsencode(out), _RENAME_EXCHANGE) == 0
    except (AttributeError, OSError):  # no renameat2 in this C library
        swapped = False
    if swapped:
        return
    old = stage.with_name(stage.name + "-old")  # both renames atomic: at every moment one complete export exists
    os.rename(out, old)
    os.rename(stage, out)
    os.rename(old, stage)
