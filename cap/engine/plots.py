"""Figures of a pruned network: units kept per residual block, and the gate thetas over training.

Matplotlib with the Agg backend (files only, no display), so plots work on headless training nodes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: never try to open a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# One colour family per stage: blocks of a stage share a hue and differ in shade.
_STAGE_CMAPS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
_STAGE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:gray")
_DPI = 120


def _stage_of(name: str) -> str:
    """'stage2.block3' -> 'stage2'; a name without a dot is its own stage."""
    return name.split(".", 1)[0]


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _stages(names: list[str]) -> list[str]:
    """The stages of `names`, in order of first appearance."""
    stages: list[str] = []
    for name in names:
        if _stage_of(name) not in stages:
            stages.append(_stage_of(name))
    return stages


def _check_structure(structure: list[dict]) -> None:
    if not structure:
        raise ValueError("plot_structure: empty structure (no residual blocks to plot)")
    for i, block in enumerate(structure):
        missing = [k for k in ("name", "kept", "units", "of") if k not in block]
        if missing:
            raise ValueError(f"plot_structure: block {i} ({block.get('name', '?')}) lacks {', '.join(missing)}")


def _bar_positions(structure: list[dict]) -> list[float]:
    """x positions: blocks side by side, one empty slot between stages."""
    xs, x, prev = [], 0.0, None
    for block in structure:
        stage = _stage_of(block["name"])
        if prev is not None and stage != prev:
            x += 1.0
        xs.append(x)
        x += 1.0
        prev = stage
    return xs


def _draw_bar(ax: Any, xi: float, block: dict, color: str, top: int, annotate: bool) -> None:
    ax.bar(xi, block["of"], width=0.8, fill=False, edgecolor="0.65", linewidth=1.0, zorder=1)
    if block["kept"]:
        ax.bar(xi, block["units"], width=0.8, color=color, zorder=2)
        if annotate:
            ax.text(xi, block["units"] + 0.01 * top, f"{block['units']}", ha="center", va="bottom",
                    fontsize=7, zorder=3)
        return
    ax.bar(xi, block["of"], width=0.8, color="0.88", hatch="xx", edgecolor="0.45", linewidth=0.8, zorder=2)
    ax.plot(xi, 0.5 * block["of"], marker="x", color="tab:red", markersize=9, mew=2, zorder=3)
    if annotate:
        ax.text(xi, block["of"] + 0.01 * top, "removed", ha="center", va="bottom", fontsize=7,
                rotation=90, color="tab:red", zorder=3)


def _label_stages(ax: Any, xs: list[float], structure: list[dict], stages: list[str], top: int) -> None:
    """Stage names above the bars, dotted separators between stages."""
    for i, stage in enumerate(stages):
        members = [xi for xi, b in zip(xs, structure, strict=True) if _stage_of(b["name"]) == stage]
        ax.text(sum(members) / len(members), 1.12 * top, stage, ha="center", va="bottom", fontsize=9,
                color=_STAGE_COLORS[i % len(_STAGE_COLORS)], fontweight="bold")
        if i:
            ax.axvline(members[0] - 1.0, color="0.5", linestyle=":", linewidth=1.0)


def plot_structure(structure: list[dict], path: Path, title: str = "") -> Path:
    """Bar chart of the units kept in each residual block against its dense count; removed blocks hatched.

    `structure`: one dict per block position, in network order, e.g.
    {"name": "stage1.block2", "kept": True, "units": 12, "of": 16}.
    """
    _check_structure(structure)
    stages = _stages([block["name"] for block in structure])
    xs = _bar_positions(structure)

    n = len(structure)
    # about 0.38 inch a bar; capped so a ResNet-110 (54 blocks) stays a readable page width
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.38 * (xs[-1] + 1) + 2.0)), 4.2))
    top = max(max(b["of"] for b in structure), 1)
    for xi, block in zip(xs, structure, strict=True):
        color = _STAGE_COLORS[stages.index(_stage_of(block["name"])) % len(_STAGE_COLORS)]
        _draw_bar(ax, xi, block, color, top, annotate=n <= 32)
    _label_stages(ax, xs, structure, stages, top)

    ax.set_xticks(xs)
    ax.set_xticklabels([b["name"].split(".", 1)[-1] for b in structure], rotation=90, fontsize=7)
    ax.set_xlim(xs[0] - 0.8, xs[-1] + 0.8)
    ax.set_ylim(0, 1.25 * top)
    ax.set_ylabel("internal units kept")
    kept = [b for b in structure if b["kept"]]
    units, dense = sum(b["units"] for b in kept), sum(b["of"] for b in structure)
    ax.set_title(title or f"{len(kept)}/{n} blocks kept, {units}/{dense} units", pad=24)
    ax.legend(handles=[Patch(facecolor=_STAGE_COLORS[0], label="units kept"),
                       Patch(fill=False, edgecolor="0.65", label="dense"),
                       Patch(facecolor="0.88", hatch="xx", edgecolor="0.45", label="block removed")],
              loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _value(entry: Any, key: str) -> float:
    """A theta from a snapshot entry; NaN where the block is gone or has no such gate (breaks the line)."""
    if not entry:
        return math.nan
    value = entry.get(key)
    return math.nan if value is None else float(value)


def _sorted_snapshots(trajectory: list[dict]) -> list[dict]:
    if not trajectory:
        raise ValueError("plot_theta_trajectory: empty trajectory (no snapshots to plot)")
    for i, snap in enumerate(trajectory):
        if "epoch" not in snap or "blocks" not in snap:
            raise ValueError(f"plot_theta_trajectory: snapshot {i} lacks 'epoch' or 'blocks'")
    return sorted(trajectory, key=lambda s: (s["epoch"], s.get("step", 0)))


def _block_names(snaps: list[dict]) -> list[str]:
    names: list[str] = []
    for snap in snaps:
        for name in snap["blocks"]:
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("plot_theta_trajectory: the snapshots hold no blocks")
    return names


def _lifetime(entries: list[Any]) -> tuple[int, int] | None:
    """First and last snapshot of a block: it exists from its first snapshot on, and after the first gap it is
    removed for good; None where it never appears."""
    present = [i for i, e in enumerate(entries) if e]
    if not present:
        return None
    last = present[0]
    while last + 1 < len(entries) and entries[last + 1]:
        last += 1
    return present[0], last


def _draw_thetas(axes: tuple[Any, Any], epochs: list[float], entries: list[Any], color: Any,
                 marker: str | None) -> None:
    """One block's layer theta (first axes) and mean unit theta (second), with an x where it was removed."""
    life = _lifetime(entries)
    if life is None:
        return
    first, last = life
    for ax, key in zip(axes, ("layer", "units_mean"), strict=True):
        ys = [_value(entries[i], key) if first <= i <= last else math.nan for i in range(len(entries))]
        ax.plot(epochs, ys, color=color, linewidth=1.2, marker=marker, markersize=3)
        if last + 1 < len(entries) and not math.isnan(ys[last]):  # removed: mark where it ended
            ax.plot(epochs[last], ys[last], marker="x", color=color, markersize=7, mew=2)


def plot_theta_trajectory(trajectory: list[dict], path: Path, title: str = "") -> Path:
    """Layer theta and mean unit theta of every block over epochs; a line ends where its block was removed.

    `trajectory`: snapshots {"step": int, "epoch": float, "blocks": {name: {"layer": ..., "units_mean": ...,
    "units_kept_frac": ...} or None}}; a block that is None or missing has been removed.
    """
    snaps = _sorted_snapshots(trajectory)
    names = _block_names(snaps)
    stages = _stages(names)
    per_stage = {s: [n for n in names if _stage_of(n) == s] for s in stages}

    epochs = [float(s["epoch"]) for s in snaps]
    marker = "o" if len(snaps) < 3 else None
    fig, (ax_layer, ax_units) = plt.subplots(2, 1, sharex=True, figsize=(8.0, 6.0))
    for name in names:
        stage = _stage_of(name)
        members = per_stage[stage]
        shade = 0.45 + 0.5 * (members.index(name) / max(len(members) - 1, 1))
        color = plt.get_cmap(_STAGE_CMAPS[stages.index(stage) % len(_STAGE_CMAPS)])(shade)
        _draw_thetas((ax_layer, ax_units), epochs, [snap["blocks"].get(name) for snap in snaps], color, marker)

    for ax, label in ((ax_layer, "layer θ"), (ax_units, "mean unit θ")):
        ax.axhline(0.5, color="0.6", linestyle=":", linewidth=1.0)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_units.set_xlabel("epoch")
    handles = [Line2D([], [], color=plt.get_cmap(_STAGE_CMAPS[i % len(_STAGE_CMAPS)])(0.7), label=s)
               for i, s in enumerate(stages)]
    handles.append(Line2D([], [], color="0.3", marker="x", linestyle="none", mew=2, label="block removed"))
    ax_layer.legend(handles=handles, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                    ncol=min(len(handles), 7), frameon=False)
    ax_layer.set_title(title or f"gate thetas of {len(names)} blocks", pad=22)
    fig.tight_layout()
    return _save(fig, path)
