"""Sweep throughput: the same trials with Ray running them concurrently vs. one after another.

Both modes are real `cap sweep` runs of the same grid (same tau/alpha/beta points, same epochs):
  sequential: max_concurrent 1, each trial owns every core (torch threads = cores)
  concurrent: max_concurrent = cores, one core (one torch thread) per trial
Reported: wall time, trials per hour, the ratio concurrent/sequential, and the machine's CPU
utilisation during each sweep (busy share of all cores, sampled from /proc/stat).

    python tools/bench_sweep.py --out bench_out/sweep --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_block import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_sweep:start -->", "<!-- bench_sweep:end -->"


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class CpuSampler(threading.Thread):
    """Busy share of the whole machine between start() and stop()."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self._done = threading.Event()

    def run(self) -> None:
        last = cpu_times()
        while not self._done.wait(1.0):
            now = cpu_times()
            self.samples.append((now[0] - last[0]) / max(now[1] - last[1], 1))
            last = now

    def stop(self) -> float:
        self._done.set()
        self.join()
        return sum(self.samples) / max(len(self.samples), 1)


def sweep_file(folder: Path, name: str, concurrent: int, cpus: int, args: argparse.Namespace) -> Path:
    spec = {
        "name": name,
        "base": {"config": str(ROOT / "configs" / "smoke.yaml"),
                 "overrides": [f"data.train_subset={args.train_subset}", "data.test_subset=500",
                               f"train.epochs={args.epochs}", f"train.threads={cpus}", "prune.warmup_epochs=0.5",
                               "prune.check_every=5", "prune.eta=0.03", "prune.bn_batches=2"]},
        "space": {"prune.tau": {"grid": args.taus}, "prune.alpha": {"grid": [0.3, 0.7]}},
        "search": "grid", "resources": {"cpus": cpus}, "max_concurrent": concurrent,
        "storage": str(folder / "sweeps"), "tracking": {"uri": f"sqlite:///{folder}/mlflow.db", "experiment": name},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_mode(folder: Path, name: str, concurrent: int, cpus: int, args: argparse.Namespace) -> dict:
    path = sweep_file(folder, name, concurrent, cpus, args)
    sampler = CpuSampler()
    sampler.start()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cap", "sweep", str(path)], cwd=folder, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    busy = sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = json.loads((folder / "sweeps" / name / "sweep_results.json").read_text())
    trials = len(rows)
    return {"mode": name, "max_concurrent": concurrent, "threads_per_trial": cpus, "trials": trials,
            "seconds": seconds, "trials_per_hour": 3600 * trials / seconds, "cpu_busy": busy,
            "train_seconds_mean": sum(r["train_seconds"] for r in rows) / trials,
            "test_acc": [r["test_acc"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out/sweep"))
    parser.add_argument("--taus", type=float, nargs="+", default=[0.3, 1.0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=1500)
    parser.add_argument("--write-docs", type=Path)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    folder = args.out.resolve()
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    sequential = run_mode(folder, "sequential", 1, cores, args)
    concurrent = run_mode(folder, "concurrent", cores, 1, args)
    ratio = concurrent["trials_per_hour"] / sequential["trials_per_hour"]
    result = {"cores": cores, "sequential": sequential, "concurrent": concurrent, "throughput_ratio": ratio}
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    cmd = "python tools/bench_sweep.py " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{cmd}` ({cores} cores; {sequential['trials']} trials of ResNet-20 on "
        f"{args.train_subset} Fashion-MNIST images, {args.epochs} epochs each; both modes in one run).",
        "",
        "| mode | trials at once | torch threads per trial | wall time | trials per hour | CPU busy | "
        "mean training time per trial |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (sequential, concurrent):
        lines.append(f"| {r['mode']} | {r['max_concurrent']} | {r['threads_per_trial']} | {r['seconds']:.0f} s | "
                     f"{r['trials_per_hour']:.1f} | {r['cpu_busy']:.0%} | {r['train_seconds_mean']:.1f} s |")
    lines += ["", f"Concurrent / sequential throughput: **{ratio:.2f}x**."]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        write_block(args.write_docs, START, END, text)


if __name__ == "__main__":
    main()
