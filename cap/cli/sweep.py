"""`cap sweep SWEEP.yaml [--address ADDR]`: run or resume a Ray Tune sweep (see cap/sweeps/tune.py, sweeps/)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cap sweep",
        description="Ray Tune over the trade-off parameters (prune.tau, prune.alpha, prune.beta or any config key). "
                    "Each trial is a full cap training run and an MLflow run nested under the sweep's parent run. "
                    "Running the same command again resumes an interrupted sweep; finished trials are kept. "
                    "Exit status: 0 all trials finished, 1 some trial failed after its retries, 2 bad sweep file "
                    "or store, 130 interrupted (resumable).")
    parser.add_argument("spec", metavar="SWEEP.yaml", help="sweep file (keys: see docs/sweeps.md)")
    parser.add_argument("--address", help="an existing Ray cluster (e.g. 'auto' or host:6379); default: start Ray "
                                          "on this machine with its CPUs (SLURM_CPUS_ON_NODE inside a SLURM job)")
    parser.add_argument("--storage", help="override the spec's storage folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    from cap.engine.config import ConfigError
    from cap.sweeps.spec import load_sweep
    from cap.sweeps.tune import SweepError, run_sweep

    args = build_parser().parse_args(argv)
    try:
        status, _ = run_sweep(load_sweep(args.spec, args.storage), args.address)
    except (ConfigError, SweepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
