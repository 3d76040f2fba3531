"""Quality and training cost: cap against its ablations and Torch-Pruning at equal epochs, with fronts.

Per model and tau, one after another in this invocation (same machine state, same seed, same recipe and
total epochs for every method):
  dense         tau = 0
  cap           unit and layer gates (prune.tau = tau)
  cap units     unit gates only (prune.layers = false)
  cap layers    layer gates only (prune.units = false)
  torch-pruning dense until cap's hardening point, one-shot group-L1 to cap's MAC ratio, fine-tune
                (tools/peers/torch_pruning_baseline.py)
  scratch       cap's final architecture trained from scratch (model.arch): the lower limit of the cost of
                training that network
Each method's points form its front (maximise test accuracy and MAC reduction); the 2-D hypervolume
against the reference point (accuracy 0, MAC reduction 0) ranks the fronts by one number. Writes
results.json, a PNG per model and, with --write-docs, a section of docs/benchmarks.md.

Profiles: quick (minutes: ResNet-20 on a 5k subset, 4 epochs, 2 taus) and full (20k subset, 8 epochs,
2 taus; ResNet-20 about an hour on 2 cores, ResNet-56 about three: `--models` picks one, and `--parallel N`
with `--set train.device=cuda ...` runs a phase's runs side by side on a GPU).

    python tools/bench_quality.py --profile quick --out bench_out/quality-quick --write-docs docs/benchmarks.md
    python tools/bench_quality.py --profile full --models resnet20 --out bench_out/quality-full \
        --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import cap_run, peer_run  # noqa: E402
from docs_block import write_block  # noqa: E402

from cap.sweeps.pareto import hypervolume_2d  # noqa: E402

CONFIG = "configs/fmnist_resnet20.yaml"
COMMON = ["tracking.enabled=false", "train.checkpoint=false"]
PROFILES = {
    # eta = 1 / steps per epoch: a zero-importance structure reaches 0 in about one epoch
    "quick": {"models": ["resnet20"], "taus": [0.6, 1.5],
              "overrides": ["data.train_subset=5000", "data.test_subset=2000", "train.epochs=4", "prune.eta=0.025"]},
    "full": {"models": ["resnet20", "resnet56"], "taus": [0.6, 1.2],
             "overrides": ["data.train_subset=20000", "train.epochs=8", "prune.eta=0.006"]},
}
METHODS = ["cap", "cap units", "cap layers", "torch-pruning", "scratch"]


def point(s: dict, dense_macs: float) -> tuple[float, float]:
    """(MAC reduction against the dense network, test accuracy)."""
    return 1 - s["macs_final"] / dense_macs, s["test_acc"]


def _result(future: Future, pool: ThreadPoolExecutor) -> dict:
    """The run's summary; a failed run cancels the runs still queued instead of waiting hours for them."""
    try:
        return future.result()
    except Exception:
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def run_model(model: str, profile: dict, out: Path, skip: bool, extra: list[str], pool: ThreadPoolExecutor) -> dict:
    """Phase 1: dense and, per tau, the three cap variants; phase 2 (needs cap's result): Torch-Pruning at
    cap's MACs and cap's architecture from scratch. Runs of a phase go to `pool` (one worker: one at a time)."""
    base = [*profile["overrides"], *COMMON, *extra, f"model.name={model}"]
    epochs = int(next(o for o in base if o.startswith("train.epochs=")).split("=")[1])
    first = {("dense", None): pool.submit(cap_run, CONFIG, [*base, "prune.tau=0"], out / "dense", skip)}
    for tau in profile["taus"]:
        t = f"{tau:g}"
        first[("cap", t)] = pool.submit(cap_run, CONFIG, [*base, f"prune.tau={tau}"], out / f"cap_tau{t}", skip)
        first[("cap units", t)] = pool.submit(cap_run, CONFIG, [*base, f"prune.tau={tau}", "prune.layers=false"],
                                              out / f"units_tau{t}", skip)
        first[("cap layers", t)] = pool.submit(cap_run, CONFIG, [*base, f"prune.tau={tau}", "prune.units=false"],
                                               out / f"layers_tau{t}", skip)
    done = {key: _result(f, pool) for key, f in first.items()}
    second = {}
    for tau in profile["taus"]:
        t = f"{tau:g}"
        cap = done[("cap", t)]
        prune_at = (cap["hardened_at_step"] / cap["steps_per_epoch"] / epochs) if cap["hardened_at_step"] else 0.5
        second[("torch-pruning", t)] = pool.submit(peer_run, CONFIG, [*profile["overrides"], *extra,
                                                                      f"model.name={model}"],
                                                   cap["mac_ratio"], prune_at, out / f"tp_tau{t}", skip)
        second[("scratch", t)] = pool.submit(cap_run, CONFIG, [*base, "prune.tau=0",
                                                               f"model.arch={out / f'cap_tau{t}' / 'model.pt'}"],
                                             out / f"scratch_tau{t}", skip)
    done.update({key: _result(f, pool) for key, f in second.items()})
    res: dict = {"dense": done[("dense", None)], "taus": {}}
    print(f"{model} dense {res['dense']['test_acc']:.4f}", flush=True)
    for tau in profile["taus"]:
        t = f"{tau:g}"
        runs = {method: done[(method, t)] for method in METHODS}
        for name, s in runs.items():
            print(f"{model} tau {tau} {name}: acc {s['test_acc']:.4f}, MAC ratio "
                  f"{s['macs_final'] / res['dense']['macs_dense']:.3f}, {s['train_seconds']:.0f} s", flush=True)
        res["taus"][t] = runs
    return res


def plot(model: str, res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = res["dense"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.axhline(100 * dense["test_acc"], color="grey", ls="--", lw=1, label="dense")
    for method in METHODS:
        pts = sorted((*point(runs[method], dense["macs_dense"]), tau) for tau, runs in res["taus"].items())
        ax.plot([100 * x for x, _, _ in pts], [100 * y for _, y, _ in pts], marker="o", label=method)
        for x, y, tau in pts:
            ax.annotate(tau, (100 * x, 100 * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("MAC reduction %")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{model}: accuracy against MAC reduction (labels: tau)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(model: str, res: dict, results: dict, command: str, image: str) -> str:
    dense = res["dense"]
    contended = results["parallel"] > 1
    lines = [f"Command: `{command}` ({results['date']}, {results['profile']} profile: "
             f"{' '.join(results['overrides'])}; one seed, one run per row"
             + (f"; {results['parallel']} runs at a time, so training times are contended and not compared)"
                if contended else ")"), "",
             f"**{model}** (dense: {100 * dense['test_acc']:.2f} %, {dense['train_seconds']:.0f} s)", "",
             "| tau | method | test acc % | vs dense (pt) | MAC cut % | param cut % | blocks kept | units kept | "
             "train time / dense |", "|---|---|---|---|---|---|---|---|---|"]
    for tau, runs in res["taus"].items():
        for method in METHODS:
            s = runs[method]
            cut, acc = point(s, dense["macs_dense"])
            pcut = 1 - s["params_final"] / dense["params_dense"]
            time_ratio = "-" if contended else f"{s['train_seconds'] / dense['train_seconds']:.2f}"
            blocks = f"{s['layers_kept']}/{s['layers_total']}" if "layers_kept" in s else "-"
            units = f"{s['units_kept']}/{s['units_total']}" if "units_kept" in s else "-"
            lines.append(f"| {tau} | {method} | {100 * acc:.2f} | {100 * (acc - dense['test_acc']):+.2f} | "
                         f"{100 * cut:.1f} | {100 * pcut:.1f} | {blocks} | {units} | {time_ratio} |")
    hv = {m: hypervolume_2d([point(r[m], dense["macs_dense"]) for r in res["taus"].values()]) for m in METHODS}
    lines += ["", "Hypervolume (accuracy x MAC reduction above (0, 0); larger is better): "
              + ", ".join(f"{m} {v:.4f}" for m, v in hv.items()), "", f"![{model}]({image})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, default=Path("bench_out/quality"))
    parser.add_argument("--skip-existing", action="store_true")
    parser.add_argument("--models", nargs="+", help="a subset of the profile's models")
    parser.add_argument("--taus", nargs="+", type=float, help="replace the profile's taus (e.g. smaller ones for "
                        "ResNet-56, whose 27 blocks each carry a small share of the cost)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs of a phase at once (e.g. on a GPU); times are then contended, not comparable")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value",
                        help="overrides for every run, e.g. train.device=cuda data.root=DIR")
    parser.add_argument("--write-docs", type=Path)
    args = parser.parse_args()
    profile = dict(PROFILES[args.profile], **({"taus": args.taus} if args.taus else {}))
    models = args.models or profile["models"]
    unknown = sorted(set(models) - set(profile["models"]))
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} not in the {args.profile} profile "
                     f"({', '.join(profile['models'])})")
    results = {"profile": args.profile, "taus": profile["taus"], "overrides": [*profile["overrides"], *args.set],
               "parallel": args.parallel,
               "date": time.strftime("%Y-%m-%d"), "models": {}}
    images = {}
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for model in models:
            results["models"][model] = run_model(model, profile, args.out / model, args.skip_existing, args.set,
                                                 pool)
            (args.out / "results.json").write_text(json.dumps(results, indent=2))  # before plotting
            image = Path("docs/img") / f"quality_{args.profile}_{model}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            plot(model, results["models"][model], image)
            images[model] = str(image.relative_to("docs"))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    command = "python tools/bench_quality.py " + " ".join(sys.argv[1:])
    for model, res in results["models"].items():
        text = report(model, res, results, command, images[model])
        print(text)
        if args.write_docs:
            write_block(args.write_docs, f"<!-- bench_quality_{args.profile}_{model}:start -->",
                        f"<!-- bench_quality_{args.profile}_{model}:end -->", text)


if __name__ == "__main__":
    main()
