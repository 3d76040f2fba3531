"""Data-parallel benchmark: per-step time of 1 process against 2 processes (torchrun, gloo), side by side.

On a 2-core machine DDP is for correctness, not speed: one process uses both cores for its
convolutions, two processes use one core each and add an all-reduce per step. Both runs train the
same network (gates sampled from step 0, no removals, so the size stays fixed) on the same per-rank
batch, and are timed on their second epoch. Rounds alternate the two so drift hits both alike.

    python tools/bench_ddp.py --out bench_out/ddp --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_block import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_ddp:start -->", "<!-- bench_ddp:end -->"
OVERRIDES = ["data.train_subset=6000", "data.test_subset=1000", "data.batch_size=64", "train.epochs=2",
             "train.progress=false", "tracking.enabled=false", "train.checkpoint=false",
             "prune.warmup_epochs=0", "prune.check_every=1000000", "prune.bn_batches=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(processes: int, tau: float, out: Path) -> dict:
    """Seconds per step of the second epoch (the first includes start-up work)."""
    overrides = [*OVERRIDES, f"prune.tau={tau}"]
    train = ["-m", "cap", "train", "--config", "configs/fmnist_resnet20.yaml", "--out", str(out), *overrides]
    if processes == 1:
        cmd, env = [sys.executable, *train, "train.threads=2"], dict(os.environ)
    else:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, f"--nproc_per_node={processes}", f"--master_port={free_port()}", *train]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))}
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    summary = json.loads((out / "summary.json").read_text())
    return {"step_s": summary["epoch_seconds"][1] / summary["steps_per_epoch"],
            "global_batch": summary["global_batch_size"], "steps": summary["steps_per_epoch"]}


def report(results: dict, rounds: int, command: str) -> str:
    lines = [f"Command: `{command}` ({os.cpu_count()} CPU cores, ResNet-20, Fashion-MNIST 6k subset, batch 64 per "
             f"process, median of {rounds} alternating rounds, second epoch of each run)", "",
             "| network | processes | s/step | images/s | steps/epoch | images/s vs 1 process |",
             "|---|---|---|---|---|---|"]
    for tau, label in ((0.0, "dense (tau 0)"), (1.0, "cap, gates sampled (tau 1)")):
        base = None
        for processes in (1, 2):
            step = statistics.median(r["step_s"] for r in results[(tau, processes)])
            batch = results[(tau, processes)][0]["global_batch"]
            rate = batch / step
            base = base or rate
            lines.append(f"| {label} | {processes} | {step:.3f} | {rate:.0f} | {results[(tau, processes)][0]['steps']} "
                         f"| {rate / base:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out/ddp"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write-docs", type=Path)
    args = parser.parse_args()
    results: dict = {}
    for r in range(args.rounds):
        for tau in (0.0, 1.0):
            for processes in (1, 2):
                res = one_run(processes, tau, args.out / f"tau{tau}-p{processes}-r{r}")
                results.setdefault((tau, processes), []).append(res)
                print(f"round {r} tau {tau} processes {processes}: {res['step_s']:.3f} s/step", flush=True)
    command = "python tools/bench_ddp.py " + " ".join(sys.argv[1:])
    text = report(results, args.rounds, command)
    print(text)
    if args.write_docs:
        write_block(args.write_docs, START, END, text)


if __name__ == "__main__":
    main()
