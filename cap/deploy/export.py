"""`cap export`: a finished run folder's compact model written as a state_dict, TorchScript or ONNX, with arch.json."""

from __future__ import annotations

import json
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


def export(run_dir: str | Path, out_dir: str | Path, fmt: str = "state_dict", round_to: int | None = None) -> Path:
    """Write out_dir/arch.json plus model.pt (state_dict), model.ts (TorchScript), model.onnx or model.pt2."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if round_to is not None and round_to < 1:
        raise ExportError(f"--round-to must be >= 1, got {round_to}")
    model, trained = load_run_model(Path(run_dir))
    compact = compact_from_gated(model, round_to)
    arch = compact_architecture(model, trained["name"], trained["kwargs"], round_to)
    size, channels = trained["kwargs"]["input_size"], trained["kwargs"]["in_channels"]
    arch["macs"], arch["params"] = count_macs_params(compact, size, channels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "arch.json").write_text(json.dumps(arch, indent=2))
    example = torch.zeros(1, channels, size, size)
    torch.save(compact.state_dict(), out / "model.pt")  # the weights always travel with arch.json
    load_compact(out)  # what was written must load back (e.g. a width rounded past the dense width fails here)
    if fmt == "torchscript":
        torch.jit.save(torch.jit.trace(compact, example), out / "model.ts")
        return out / "model.ts"
    if fmt == "onnx":
        torch.onnx.export(compact, (example,), str(out / "model.onnx"), input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
        return out / "model.onnx"
    if fmt == "exported_program":  # torch.export, TorchScript's successor (torch.export.load reads it); dynamic batch
        program = torch.export.export(compact, (torch.zeros(2, channels, size, size),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, out / "model.pt2")
        return out / "model.pt2"
    return out / "model.pt"
