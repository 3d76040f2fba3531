"""Budget targets against cap's own fixed-tau front: does asking for a cut cost accuracy?

Runs (one after another, same seed and recipe) cap at each MAC target (prune.target_macs) and at each
fixed tau, then reads the fixed-tau front (accuracy against MAC reduction, dense included at 0 % cut)
at every target run's cut, linear between neighbouring points. A target run is "at or above the front"
when its accuracy is not below that read-off. Writes results.json, a docs block (--write-docs) and
docs/data/targets_<model>_<profile>.json (--json-dir).

    python tools/bench_targets.py --profile quick --model resnet20 --targets 0.3 0.5 0.7 \
        --taus 0.15 0.3 0.6 1.2 2.4 --out bench_out/targets/quick_resnet20 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import cap_run  # noqa: E402
from bench_quality import read_off  # noqa: E402
from docs_block import write_block  # noqa: E402

CONFIG = "configs/fmnist_resnet20.yaml"
COMMON = ["tracking.enabled=false", "train.checkpoint=false"]
PROFILES = {
    "quick": ["data.train_subset=5000", "train.epochs=4", "prune.eta=0.025"],
    "full": ["data.train_subset=20000", "train.epochs=8", "prune.eta=0.006"],
}


def cut(summary: dict) -> float:
    return 1 - summary["macs_final"] / summary["macs_dense"]


def compare(dense: dict, taus: dict[str, dict], targets: dict[str, dict]) -> list[dict]:
    """One row per target run: where it landed, its accuracy, and the fixed-tau front read at its cut."""
    front = [(0.0, dense["test_acc"])] + [(cut(s), s["test_acc"]) for s in taus.values()]
    rows = []
    for target, s in targets.items():
        at = read_off(front, cut(s))
        rows.append({"target": float(target), "mac_ratio": s["macs_final"] / s["macs_dense"],
                     "target_reached": s["target_reached"], "test_acc": s["test_acc"], "front_acc": at,
                     "vs_front": None if at is None else s["test_acc"] - at,
                     "blocks_kept": s["layers_kept"], "units_kept": s["units_kept"],
                     "budget_switched": s.get("budget_switched"), "tau_final": s["tau_now"]})
    return rows


def report(model: str, profile: str, dense: dict, taus: dict[str, dict], rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {profile} profile: "
             f"{' '.join(PROFILES[profile])}; one seed, one run per row)", "",
             f"**{model}**, dense {100 * dense['test_acc']:.2f} %. Fixed-tau front: "
             + ", ".join(f"tau {t}: {100 * s['test_acc']:.2f} % at {100 * cut(s):.1f} %" for t, s in taus.items()),
             "", "| target | MAC ratio | reached | test acc % | fixed-tau front at that cut % | vs front (pt) | "
             "blocks kept | units kept | tau at the end |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        front = "-" if r["front_acc"] is None else f"{100 * r['front_acc']:.2f}"
        versus = "-" if r["vs_front"] is None else f"{100 * r['vs_front']:+.2f}"
        lines.append(f"| {r['target']:g} | {r['mac_ratio']:.3f} | {r['target_reached']} | {100 * r['test_acc']:.2f} | "
                     f"{front} | {versus} | {r['blocks_kept']} | {r['units_kept']} | {r['tau_final']:.3g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--taus", nargs="+", type=float, default=[0.3, 0.6, 1.2])
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every run")
    parser.add_argument("--out", type=Path, default=Path("bench_out/targets"))
    parser.add_argument("--skip-existing", action="store_true", help="reuse run folders that hold a summary.json")
    parser.add_argument("--write-docs", type=Path)
    parser.add_argument("--json-dir", type=Path, help="write DIR/targets_<model>_<profile>.json")
    args = parser.parse_args()
    base = [*PROFILES[args.profile], *COMMON, *args.set, f"model.name={args.model}"]
    dense = cap_run(CONFIG, [*base, "prune.tau=0"], args.out / "dense", args.skip_existing)
    taus = {f"{t:g}": cap_run(CONFIG, [*base, f"prune.tau={t}"], args.out / f"tau{t:g}", args.skip_existing)
            for t in args.taus}
    targets = {f"{t:g}": cap_run(CONFIG, [*base, f"prune.target_macs={t}"], args.out / f"t{t:g}", args.skip_existing)
               for t in args.targets}
    rows = compare(dense, taus, targets)
    command = "python tools/bench_targets.py " + " ".join(sys.argv[1:])
    text = report(args.model, args.profile, dense, taus, rows, command)
    print(text)
    results = {"command": command, "profile": args.profile, "overrides": base, "dense": dense["test_acc"],
               "taus": {t: {"test_acc": s["test_acc"], "mac_cut": cut(s)} for t, s in taus.items()}, "targets": rows}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    if args.json_dir:
        args.json_dir.mkdir(parents=True, exist_ok=True)
        (args.json_dir / f"targets_{args.model}_{args.profile}.json").write_text(json.dumps(results, indent=2))
    if args.write_docs:
        tag = f"bench_targets_{args.profile}_{args.model}"
        write_block(args.write_docs, f"<!-- {tag}:start -->", f"<!-- {tag}:end -->", text)


if __name__ == "__main__":
    main()
