"""Print the thetas of a finished run, block by block: `python tools/inspect_run.py RUN_DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cap.models import build_from_architecture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    saved = torch.load(args.run_dir / "model.pt", weights_only=True)
    model = build_from_architecture(saved["arch"])
    model.load_state_dict(saved["state_dict"])
    for stage, index, block in model.block_slots():
        name = f"stage{stage + 1}.block{index + 1}"
        if block.is_removed:
            print(f"{name}: removed")
            continue
        units = " | ".join(
            f"{g.size} units, kept {int(g.keep_mask().sum())}, theta quartiles "
            + ", ".join(f"{q:.2f}" for q in torch.quantile(g.theta, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])))
            for g in block.unit_gates())
        print(f"{name}: layer theta {float(block.layer_gate.theta):.3f}; {units}")


if __name__ == "__main__":
    main()
