"""The gated step against the plain step: time, the pruner's share, operators dispatched, host reads.

One process, one model at a time, the two kinds of step interleaved (rounds of `--steps` plain steps, then
`--steps` gated steps) so that both see the same machine state. A step is forward + backward + optimizer
(+ the pruner's before_forward/after_step when gated). Gated steps sample every gate (warm-up 0) and stay
dense in expectation: the thetas are reset to 1 after each step, so the network never shrinks and the ratio
is the cost of gating alone. Pruning checks are left out (check_every is huge): they are the one place the
host is meant to read device values.

Per model it reports:
  step_ratio     median gated step / median plain step
  pruner_share   the pruner's calls (before_forward + after_step) as a fraction of the gated step
  ops            aten operators dispatched per step, plain and gated, and by the pruner's own calls
                 (a TorchDispatchMode count; independent of the batch size)
  host_reads     aten::_local_scalar_dense per gated step: every bool(t), float(t), t.item() and t.tolist()
                 on a tensor, i.e. a host sync on a GPU (counted here on the CPU, where it is the same call)

    python tools/bench_step.py --models resnet20 resnet56 --batch 128 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_block import write_block  # noqa: E402

from cap.core.config import PruneConfig  # noqa: E402
from cap.core.gates import set_gate_mode  # noqa: E402
from cap.core.pruner import Pruner  # noqa: E402
from cap.models import create_model  # noqa: E402

HOST_READ = "_local_scalar_dense"


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active (overload packets, e.g. 'convolution')."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class Bench:
    """One model with its optimizer and pruner, and the two kinds of step."""

    def __init__(self, model_name: str, batch: int, size: int, cfg: PruneConfig, device: str = "cpu") -> None:
        torch.manual_seed(0)
        self.model = create_model(model_name, num_classes=10, in_channels=3, input_size=size).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.pruner = Pruner(self.model, cfg, steps_per_epoch=10**6, epochs=1, optimizer=self.optimizer)
        self.x = torch.randn(batch, 3, size, size, device=device)
        self.y = torch.randint(0, 10, (batch,), device=device)
        self.pruner_seconds = 0.0

    def step(self, gated: bool) -> None:
        if gated:
            start = time.perf_counter()
            self.pruner.before_forward()
            self.pruner_seconds += time.perf_counter() - start
        else:
            set_gate_mode(self.model, "dense")
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if gated:
            start = time.perf_counter()
            self.pruner.after_step()
            self.pruner_seconds += time.perf_counter() - start
            with torch.no_grad():  # stay dense in expectation: measure gating, not a shrinking network
                for gate in self.pruner.active_gates():
                    gate.theta.fill_(1.0)


def count_ops(step: Callable[[], None]) -> Counter[str]:
    """The aten operators one call of `step` dispatches."""
    with OpCounter() as counter:
        step()
    return counter.ops


def pruner_ops(bench: Bench) -> Counter[str]:
    """The aten operators the pruner's own calls (before_forward, after_step) dispatch in one sampling step."""
    counter = OpCounter()
    with counter:
        bench.pruner.before_forward()
    F.cross_entropy(bench.model(bench.x), bench.y).backward()
    with counter:
        bench.pruner.after_step()
    bench.optimizer.zero_grad(set_to_none=True)
    return counter.ops


def measure(model_name: str, batch: int, size: int, rounds: int, steps: int) -> dict:
    cfg = PruneConfig(tau=0.6, warmup_epochs=0, check_every=10**9, harden_at=None)
    bench = Bench(model_name, batch, size, cfg)
    for gated in (False, True):  # warm-up: allocator, caches, the first draws
        bench.step(gated)
    plain_ops = count_ops(lambda: bench.step(False))
    gated_ops = count_ops(lambda: bench.step(True))
    own_ops = pruner_ops(bench)
    times: dict[bool, list[float]] = {False: [], True: []}
    bench.pruner_seconds = 0.0
    for _ in range(rounds):
        for gated in (False, True):
            for _ in range(steps):
                start = time.perf_counter()
                bench.step(gated)
                times[gated].append(time.perf_counter() - start)
    plain, gated = statistics.median(times[False]), statistics.median(times[True])
    return {"model": model_name, "batch": batch, "input": size, "plain_step_s": plain, "gated_step_s": gated,
            "step_ratio": gated / plain, "pruner_share": bench.pruner_seconds / sum(times[True]),
            "ops_plain": sum(plain_ops.values()), "ops_gated": sum(gated_ops.values()),
            "ops_pruner": sum(own_ops.values()),
            "host_reads_plain": plain_ops[HOST_READ], "host_reads_gated": gated_ops[HOST_READ],
            "gates": len(bench.pruner.active_gates()), "threads": torch.get_num_threads()}


def report(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, CPU, {rows[0]['threads']} threads; "
             "median of interleaved steps, thetas held at 1)", "",
             "| model | batch, input | gates | plain step ms | gated step ms | gated / plain | pruner share | "
             "ops per step plain -> gated (pruner's own) | host reads per gated step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']}, {r['input']}x{r['input']} | {r['gates']} | "
                     f"{1e3 * r['plain_step_s']:.1f} | {1e3 * r['gated_step_s']:.1f} | {r['step_ratio']:.3f}x | "
                     f"{100 * r['pruner_share']:.1f} % | {r['ops_plain']} -> {r['ops_gated']} ({r['ops_pruner']}) | "
                     f"{r['host_reads_gated']} (plain {r['host_reads_plain']}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--input", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    parser.add_argument("--write-docs", type=Path)
    args = parser.parse_args()
    rows = [measure(m, args.batch, args.input, args.rounds, args.steps) for m in args.models]
    command = "python tools/bench_step.py " + " ".join(sys.argv[1:])
    text = report(rows, command)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    if args.write_docs:
        write_block(args.write_docs, "<!-- bench_step:start -->", "<!-- bench_step:end -->", text)


if __name__ == "__main__":
    main()
