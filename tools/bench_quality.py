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
import subprocess
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


def points(profile: dict) -> dict[str, list[str]]:
    """Label -> the overrides that put the cap methods there: a tau each, or with --targets a MAC target each
    (tau is then the multiplier's start, the profile's first tau)."""
    if profile.get("targets"):
        return {f"t{m:g}": [f"prune.target_macs={m}", f"prune.tau={profile['taus'][0]}"] for m in profile["targets"]}
    return {f"{tau:g}": [f"prune.tau={tau}"] for tau in profile["taus"]}


def _layers_run(config: str, overrides: list[str], out: Path, skip: bool) -> dict | None:
    """Layer-only pruning; None where cap rejects the target (no set of whole blocks lands within 2 points)."""
    try:
        return cap_run(config, overrides, out, skip)
    except subprocess.CalledProcessError:
        if "no set of whole blocks" in (out / "log.txt").read_text():
            return None
        raise


def run_model(model: str, profile: dict, out: Path, skip: bool, extra: list[str], pool: ThreadPoolExecutor) -> dict:
    """Phase 1: dense and, per point (a tau or a target), the three cap variants; phase 2 (needs cap's result):
    Torch-Pruning at cap's MACs and cap's architecture from scratch. Runs of a phase go to `pool`."""
    base = [*profile["overrides"], *COMMON, *extra, f"model.name={model}"]
    epochs = int(next(o for o in base if o.startswith("train.epochs=")).split("=")[1])
    first = {("dense", None): pool.submit(cap_run, CONFIG, [*base, "prune.tau=0"], out / "dense", skip)}
    where = points(profile)
    for t, at in where.items():
        first[("cap", t)] = pool.submit(cap_run, CONFIG, [*base, *at], out / f"cap_tau{t}", skip)
        first[("cap units", t)] = pool.submit(cap_run, CONFIG, [*base, *at, "prune.layers=false"],
                                              out / f"units_tau{t}", skip)
        first[("cap layers", t)] = pool.submit(_layers_run, CONFIG, [*base, *at, "prune.units=false"],
                                               out / f"layers_tau{t}", skip)
    done = {key: _result(f, pool) for key, f in first.items()}
    second = {}
    for t in where:
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
    for t in where:
        runs = {method: done[(method, t)] for method in METHODS}
        for name, s in runs.items():
            if s is None:
                print(f"{model} {t} {name}: target rejected (no set of whole blocks reaches it)", flush=True)
                continue
            print(f"{model} {t} {name}: acc {s['test_acc']:.4f}, MAC ratio "
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
        pts = sorted((*point(runs[method], dense["macs_dense"]), tau) for tau, runs in res["taus"].items()
                     if runs[method] is not None)
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
            if s is None:
                lines.append(f"| {tau} | {method} | target rejected: no set of whole blocks reaches it | | | | | | |")
                continue
            cut, acc = point(s, dense["macs_dense"])
            pcut = 1 - s["params_final"] / dense["params_dense"]
            time_ratio = "-" if contended else f"{s['train_seconds'] / dense['train_seconds']:.2f}"
            blocks = f"{s['layers_kept']}/{s['layers_total']}" if "layers_kept" in s else "-"
            units = f"{s['units_kept']}/{s['units_total']}" if "units_kept" in s else "-"
            lines.append(f"| {tau} | {method} | {100 * acc:.2f} | {100 * (acc - dense['test_acc']):+.2f} | "
                         f"{100 * cut:.1f} | {100 * pcut:.1f} | {blocks} | {units} | {time_ratio} |")
    hv = {m: hypervolume_2d([point(r[m], dense["macs_dense"]) for r in res["taus"].values() if r[m] is not None])
          for m in METHODS}
    cuts = equal_cut(res)
    lines += ["", "Accuracy % read off each method's own front at equal MAC cuts (linear between its neighbouring "
              "points; - where its points do not cover the cut):", "",
              "| method | " + " | ".join(f"{c} % cut" for c in READ_OFF) + " |", "|---|" + "---|" * len(READ_OFF)]
    lines += [f"| {m} | " + " | ".join("-" if cuts[m][str(c)] is None else f"{100 * cuts[m][str(c)]:.2f}"
                                      for c in READ_OFF) + " |" for m in METHODS]
    lines += ["", "Hypervolume (accuracy x MAC reduction above (0, 0); larger is better): "
              + ", ".join(f"{m} {v:.4f}" for m, v in hv.items()), "", f"![{model}]({image})", ""]
    return "\n".join(lines)


READ_OFF = (40, 50, 60)
"""MAC cuts (%) at which every method's accuracy is read off its own front"""


def read_off(front: list[tuple[float, float]], cut: float) -> float | None:
    """Accuracy at MAC reduction `cut` on a front of (reduction, accuracy) points, linear between the two
    neighbouring points; None outside the points' range."""
    pts = sorted(front)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= cut <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (cut - x0) / (x1 - x0)
    return pts[0][1] if len(pts) == 1 and abs(pts[0][0] - cut) < 1e-9 else None


def equal_cut(res: dict) -> dict[str, dict[str, float | None]]:
    """{method: {"40": accuracy, ...}} as docs/data/equal_cut_<model>.json holds it."""
    dense = res["dense"]["macs_dense"]
    return {m: {str(c): read_off([point(r[m], dense) for r in res["taus"].values() if r[m] is not None], c / 100)
                for c in READ_OFF} for m in METHODS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, default=Path("bench_out/quality"))
    parser.add_argument("--skip-existing", action="store_true")
    parser.add_argument("--models", nargs="+", help="a subset of the profile's models")
    parser.add_argument("--taus", nargs="+", type=float, help="replace the profile's taus (e.g. smaller ones for "
                        "ResNet-56, whose 27 blocks each carry a small share of the cost)")
    parser.add_argument("--targets", nargs="+", type=float, help="put the cap methods at these MAC targets "
                        "(prune.target_macs) instead of taus; Torch-Pruning follows cap's cut as always")
    parser.add_argument("--equal-cut-json", type=Path, metavar="DIR",
                        help="write DIR/equal_cut_<model>.json: accuracy read off each front at 40/50/60 %% cuts")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs of a phase at once (e.g. on a GPU); times are then contended, not comparable")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value",
                        help="overrides for every run, e.g. train.device=cuda data.root=DIR")
    parser.add_argument("--write-docs", type=Path)
    args = parser.parse_args()
    profile = dict(PROFILES[args.profile], **({"taus": args.taus} if args.taus else {}), targets=args.targets)
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
        if args.equal_cut_json:
            setup = {"command": command, "date": results["date"], "profile": args.profile,
                     "overrides": results["overrides"], "seeds": 1,
                     "landed_by": "target (prune.target_macs)" if args.targets else "tau",
                     "torch-pruning": "cap's MAC ratio at each point", "scratch": "cap's final architecture"}
            args.equal_cut_json.mkdir(parents=True, exist_ok=True)
            (args.equal_cut_json / f"equal_cut_{model}.json").write_text(
                json.dumps({**equal_cut(res), "setup": setup}, indent=2))
        text = report(model, res, results, command, images[model])
        print(text)
        if args.write_docs:
            write_block(args.write_docs, f"<!-- bench_quality_{args.profile}_{model}:start -->",
                        f"<!-- bench_quality_{args.profile}_{model}:end -->", text)


if __name__ == "__main__":
    main()
