"""Inference benchmark: CPU latency of the exported compact model against the dense network and against the
same pruned network with its pruned structures masked (zeroed) but not removed, side by side in one process.

For each run folder (a finished `cap train`, model.pt inside), three models of identical outputs or of the
dense baseline are timed at batch 1 and batch 64 with interleaved repetitions (median), and the measured
speed-up is set against the MAC reduction:
  dense    the dense run's network, exported (plain layers)
  masked   the pruned network at dense width: kept channels copied in, pruned channels and removed blocks
           zero (what a mask-based pruning library leaves); computes as much as dense
  compact  `cap export`: pruned structures removed
  r8       `cap export --round-to 8`: kept widths padded to multiples of 8 with zero channels
  uniform  the dense architecture with all widths (residual streams too) scaled down to about the same MACs
each in three runtimes (RUNTIMES below): eager PyTorch, the TorchScript export frozen for inference, and the
ONNX export in onnxruntime. A deployed model runs in one of the latter two.

    python tools/bench_inference.py --dense bench_out/core2/dense bench_out/core2/cap_tau0.3 \
        bench_out/core2/cap_tau0.6 bench_out/core2/cap_tau1.2 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_block import write_block  # noqa: E402

from cap.deploy.compact import (  # noqa: E402
    PlainBlock,
    build_compact,
    compact_architecture,
    compact_from_gated,
    count_macs_params,
    load_run_model,  # noqa: E402
)
from cap.models import create_model  # noqa: E402

START, END = "<!-- bench_inference:start -->", "<!-- bench_inference:end -->"


def masked_twin(compact: nn.Module, arch: dict) -> nn.Module:
    """The dense-width plain network holding `compact`'s weights in its leading channels, zeros elsewhere."""
    dense_gated = create_model(arch["name"], **arch["kwargs"])
    dense_arch = compact_architecture(dense_gated, arch["name"], arch["kwargs"], None)
    twin = build_compact(dense_arch)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        for key, value in compact.state_dict().items():
            target = twin.state_dict()[key] if key in twin.state_dict() else None
            if target is None:
                continue
            index = tuple(slice(0, n) for n in value.shape)
            target[index].copy_(value)
        for block in twin.blocks:  # BN running_var of padding channels: 1, so zero stays zero
            if isinstance(block, PlainBlock):
                for m in block.branch:
                    if isinstance(m, nn.BatchNorm2d):
                        m.running_var[m.running_var == 0] = 1.0
    return twin.eval()


RUNTIMES = ("eager", "torchscript", "onnxruntime")
"""eager: the nn.Module as exported; torchscript: the traced export, frozen and optimised for inference (BN folded
into the convolutions, conv+ReLU fused); onnxruntime: the ONNX export in onnxruntime's CPU provider (all graph
optimisations on)"""


def uniform_reference(spec: dict, macs: int) -> tuple[nn.Module, int] | tuple[None, None]:
    """The dense architecture with every width scaled by one factor (what uniform channel pruning such as
    Torch-Pruning's leaves), at the base width whose MACs come closest to `macs`: random weights, exported the
    same way. Its speed-up per MAC speed-up separates the cost of thin layers on this CPU from cap's structure."""
    if "width" not in spec["kwargs"]:  # only the CIFAR-style ResNets have one base width to scale
        return None, None
    size, channels = spec["kwargs"]["input_size"], spec["kwargs"]["in_channels"]
    best = None
    for width in range(2, spec["kwargs"]["width"] + 1):
        net = compact_from_gated(create_model(spec["name"], **{**spec["kwargs"], "width": width}).eval())
        net_macs, _ = count_macs_params(net, size, channels)
        if best is None or abs(net_macs - macs) < abs(best[1] - macs):
            best = (net, net_macs)
    return best


def deploy(model: nn.Module, x: torch.Tensor, runtime: str, threads: int) -> Callable[[torch.Tensor], object]:
    """`model` as a callable of one runtime, built for inputs shaped like `x`."""
    if runtime == "eager":
        return model
    if runtime == "torchscript":
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(model, x)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    import onnxruntime as ort

    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, input_names=["images"], output_names=["logits"], dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # idle onnxruntime threads spin by default and would steal the cores from the next model timed
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return lambda t: session.run(None, {"images": t.numpy()})


def latency_ms(model: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(x)
        return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", type=Path, required=True, help="the dense run folder")
    parser.add_argument("runs", type=Path, nargs="+", help="pruned run folders")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--write-docs", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gated, spec = load_run_model(args.dense)
    dense = compact_from_gated(gated)
    size, channels = spec["kwargs"]["input_size"], spec["kwargs"]["in_channels"]
    dense_macs, _ = count_macs_params(dense, size, channels)
    rows = []
    for run in args.runs:
        model, spec = load_run_model(run)
        compact = compact_from_gated(model)
        rounded = compact_from_gated(model, round_to=8)
        arch = compact_architecture(model, spec["name"], spec["kwargs"], None)
        masked = masked_twin(compact, arch)
        macs, _ = count_macs_params(compact, size, channels)
        uniform, uniform_macs = uniform_reference(spec, macs)
        for batch in (1, 64):
            x = torch.randn(batch, channels, size, size)
            with torch.inference_mode():
                assert float((masked(x) - compact(x)).abs().max()) < 1e-3, "the masked twin must equal the compact"
            nets = {"dense": dense, "masked": masked, "compact": compact, "r8": rounded}
            if uniform is not None:
                nets["uniform"] = uniform
            mac_speedup = dense_macs / macs
            med: dict[tuple[str, str], float] = {}
            for rt in args.runtimes:  # one runtime at a time (their thread pools would contend), nets interleaved
                variants = {name: deploy(m, x, rt, args.threads) for name, m in nets.items()}
                times: dict[str, list[float]] = {name: [] for name in variants}
                for _ in range(3):  # warm-up (TorchScript's profiling executor optimises in its first calls)
                    for m in variants.values():
                        latency_ms(m, x)
                for _ in range(args.reps):
                    for name, m in variants.items():
                        times[name].append(latency_ms(m, x))
                med.update({(rt, name): statistics.median(v) for name, v in times.items()})
                d, c = med[(rt, "dense")], med[(rt, "compact")]
                uniform_ratio = (d / med[(rt, "uniform")]) / (dense_macs / uniform_macs) if uniform else None
                rows.append((run.name, batch, rt, d, med[(rt, "masked")], c, med[(rt, "r8")],
                             1 - macs / dense_macs, d / c, mac_speedup, uniform_ratio))
                print(f"{run.name} batch {batch} {rt}: dense {d:.2f} ms, masked {med[(rt, 'masked')]:.2f} ms, "
                      f"compact {c:.2f} ms; speed-up {d / c:.2f}x of {mac_speedup:.2f}x by MACs", flush=True)
    command = "python tools/bench_inference.py " + " ".join(sys.argv[1:])
    lines = [f"Command: `{command}` (CPU, {args.threads} threads, median of {args.reps} interleaved repetitions; "
             f"torch {torch.__version__})",
             "", "| run | batch | runtime | dense ms | masked ms | compact ms | rounded-to-8 ms | MAC cut | speed-up | "
                 "MAC speed-up | speed-up / MAC speed-up | same for the uniformly thinned net |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, batch, rt, d, m, c, r8, cut, speed, ideal, uniform_ratio in rows:
        lines.append(f"| {name} | {batch} | {rt} | {d:.2f} | {m:.2f} | {c:.2f} | {r8:.2f} | {cut:.1%} | "
                     f"{speed:.2f}x | {ideal:.2f}x | {speed / ideal:.2f} | "
                     f"{'-' if uniform_ratio is None else f'{uniform_ratio:.2f}'} |")
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        write_block(args.write_docs, START, END, text)


if __name__ == "__main__":
    main()
