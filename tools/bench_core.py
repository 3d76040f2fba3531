"""Core benchmark: dense vs cap at several tau vs Torch-Pruning at cap's MAC budget, same epochs.

Every run is a separate process (`python -m cap train ...`), one after another, so that peak memory
(ru_maxrss) and time belong to that run alone. Torch-Pruning runs once per cap run, pruned to the MAC
ratio that cap reached and at the point where cap hardened its structure, so both get the same dense
/ search / fine-tune budget. The gating overhead (per-step time of the gated network before any pruning
over the plain network's) is measured in this process with the two interleaved.

    python tools/bench_core.py --config configs/fmnist_resnet20.yaml --taus 0.6 1.2 2.4 \
        --out bench_out/core --write-docs docs/benchmarks.md data.train_subset=20000 prune.eta=0.003
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_block import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_core:start -->", "<!-- bench_core:end -->"


def gating_overhead(config: str, overrides: list[str], rounds: int = 5, steps: int = 8) -> dict:
    """Median per-step time of sampled gates (with the theta step) over dense gates, interleaved."""
    from cap.core.gates import set_gate_mode
    from cap.core.pruner import Pruner
    from cap.engine.config import load_config
    from cap.models import create_model

    cfg = load_config(config, [*overrides, "prune.warmup_epochs=0", "prune.check_every=1000000"])
    model = create_model(cfg.model.name, num_classes=10, in_channels=1, input_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = Pruner(model, cfg.prune, steps_per_epoch=1000, epochs=1, optimizer=optimizer)
    x = torch.randn(cfg.data.batch_size, 1, 32, 32)
    y = torch.randint(0, 10, (cfg.data.batch_size,))
    times: dict[str, list[float]] = {"plain": [], "gated": []}

    def step(kind: str) -> None:
        start = time.perf_counter()
        if kind == "gated":
            pruner.before_forward()
        else:
            set_gate_mode(model, "dense")
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if kind == "gated":
            pruner.after_step()
            for gate in pruner.active_gates():  # keep the network dense: measure the gating cost only
                gate.theta.fill_(1.0)
        times[kind].append(time.perf_counter() - start)

    for kind in ("plain", "gated"):
        step(kind)  # warm-up
    times = {"plain": [], "gated": []}
    for _ in range(rounds):
        for kind in ("plain", "gated"):
            for _ in range(steps):
                step(kind)
    plain, gated = statistics.median(times["plain"]), statistics.median(times["gated"])
    return {"plain_step_s": plain, "gated_step_s": gated, "overhead_ratio": gated / plain}


def run_process(args: list[str], log: Path) -> None:
    with open(log, "w") as f:
        subprocess.run([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)


def cap_run(config: str, overrides: list[str], out: Path, skip: bool) -> dict:
    if not (skip and (out / "summary.json").is_file()):
        out.mkdir(parents=True, exist_ok=True)
        run_process(["-m", "cap", "train", "--config", config, "--out", str(out), "train.progress=false",
                     *overrides], out / "log.txt")
    return json.loads((out / "summary.json").read_text())


def peer_run(config: str, overrides: list[str], target: float, prune_at: float, out: Path, skip: bool) -> dict:
    if not (skip and (out / "summary.json").is_file()):
        out.mkdir(parents=True, exist_ok=True)
        run_process([str(ROOT / "tools/peers/torch_pruning_baseline.py"), "--config", config,
                     "--target-mac-ratio", f"{target:.4f}", "--prune-at", f"{prune_at:.4f}", "--out", str(out),
                     "train.progress=false", *overrides], out / "log.txt")
    return json.loads((out / "summary.json").read_text())


def row(name: str, s: dict, dense: dict) -> str:
    if "theta_undecided" not in s:
        undecided = "-"
    elif s.get("theta_undecided_at_harden") is None:
        undecided = str(s["theta_undecided"])
    else:
        undecided = f"{s['theta_undecided_at_harden']} -> {s['theta_undecided']}"
    blocks = f"{s['layers_kept']}/{s['layers_total']}" if "layers_kept" in s else "-"
    units = f"{s['units_kept']}/{s['units_total']}" if "units_kept" in s else "-"
    mac_cut, param_cut = 1 - s["macs_final"] / s["macs_dense"], 1 - s["params_final"] / s["params_dense"]
    return (f"| {name} | {100 * s['test_acc']:.2f} | {100 * (s['test_acc'] - dense['test_acc']):+.2f} | "
            f"{100 * mac_cut:.1f} | {100 * param_cut:.1f} | "
            f"{blocks} | {units} | {undecided} | {s['train_seconds'] / dense['train_seconds']:.2f} | "
            f"{s['peak_memory_mb'] / dense['peak_memory_mb']:.2f} |")


def report(results: dict, command: str) -> str:
    dense = results["dense"]
    lines = [
        f"Command: `{command}`", "",
        f"Machine: {results['machine']}. Date: {results['date']}. Seed {results['seed']}, one run per row.", "",
        "| run | test acc % | vs dense (pt) | MAC cut % | param cut % | blocks kept | units kept | "
        "undecided thetas (at hardening -> end) | train time / dense | peak memory / dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
        row("dense (tau = 0)", dense, dense),
    ]
    for tau, pair in results["taus"].items():
        lines.append(row(f"cap tau = {tau}", pair["cap"], dense))
        if "peer" in pair:
            lines.append(row(f"Torch-Pruning at cap's MACs (tau = {tau})", pair["peer"], dense))
    g = results["gating"]
    lines += ["", f"Gating overhead (per training step, before any pruning, interleaved in one process): "
              f"gated {1000 * g['gated_step_s']:.0f} ms / plain {1000 * g['plain_step_s']:.0f} ms = "
              f"**{g['overhead_ratio']:.2f}x**.", ""]
    lines.append("Epoch seconds (cap): " + "; ".join(
        f"tau {tau}: " + ", ".join(f"{t:.0f}" for t in pair["cap"]["epoch_seconds"])
        for tau, pair in results["taus"].items()) + "; dense: " + ", ".join(
        f"{t:.0f}" for t in dense["epoch_seconds"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fmnist_resnet20.yaml")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.6, 1.2, 2.4])
    parser.add_argument("--out", type=Path, default=Path("bench_out/core"))
    parser.add_argument("--no-peer", action="store_true", help="skip the Torch-Pruning runs")
    parser.add_argument("--skip-existing", action="store_true", help="reuse runs whose summary.json exists")
    parser.add_argument("--write-docs", type=Path, help="replace the bench_core section of this markdown file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    args = parser.parse_args()
    command = "python tools/bench_core.py " + " ".join(sys.argv[1:])
    from cap.engine.config import load_config

    cfg = load_config(args.config, args.overrides)
    results = {"machine": f"{torch.get_num_threads()} torch threads, CPU", "date": time.strftime("%Y-%m-%d"),
               "seed": cfg.seed, "gating": gating_overhead(args.config, args.overrides), "taus": {}}
    print(f"gating overhead {results['gating']['overhead_ratio']:.2f}x", flush=True)
    results["dense"] = cap_run(args.config, [*args.overrides, "prune.tau=0"], args.out / "dense",
                               args.skip_existing)
    print(f"dense: {results['dense']['test_acc']:.4f}", flush=True)
    for tau in args.taus:
        summary = cap_run(args.config, [*args.overrides, f"prune.tau={tau}"], args.out / f"cap_tau{tau:g}",
                          args.skip_existing)
        pair = {"cap": summary}
        print(f"cap tau {tau}: {summary['test_acc']:.4f} at MAC ratio {summary['mac_ratio']:.3f}", flush=True)
        if not args.no_peer:
            # the peer prunes where cap hardened (its dense phase = cap's warm-up + search phase)
            epochs_before = (summary["hardened_at_step"] or 0) / summary["steps_per_epoch"]
            prune_at = epochs_before / cfg.train.epochs if summary["hardened_at_step"] else 0.5
            pair["peer"] = peer_run(args.config, args.overrides, summary["mac_ratio"], prune_at,
                                    args.out / f"tp_tau{tau:g}", args.skip_existing)
            print(f"torch-pruning: {pair['peer']['test_acc']:.4f} at MAC ratio {pair['peer']['mac_ratio']:.3f} "
                  f"(pruned at {prune_at:.2f} of training)", flush=True)
        results["taus"][f"{tau:g}"] = pair
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results, command)
    print(text)
    if args.write_docs:
        write_block(args.write_docs, START, END, text)


if __name__ == "__main__":
    main()
