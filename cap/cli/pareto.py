"""`cap pareto --experiment NAME [--parent RUN_ID]`: Pareto fronts of tracked runs (see cap/sweeps/report.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cap pareto",
        description="Reads the finished runs of an MLflow experiment (or of one sweep), finds the non-dominated "
                    "ones (maximising test accuracy, MAC reduction and parameter reduction: two 2-D fronts and the "
                    "3-D one), writes pareto.csv/png/html/json, prints each front's hypervolume, and tags the runs "
                    "pareto=true/false (filter in the MLflow UI with tags.pareto = 'true').")
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--parent", metavar="RUN_ID", help="only the runs nested under this run (a sweep's parent "
                                                           "run); the files and hypervolumes are logged on it")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--out", help="output folder (default: pareto/<experiment>[-<parent>])")
    return parser


def main(argv: list[str] | None = None) -> int:
    from cap.sweeps.report import ParetoError, pareto_report
    from cap.tracking import Store, resolve_uri
    from cap.tracking.links import ui_hint
    from cap.tracking.uri import is_server

    args = build_parser().parse_args(argv)
    default = Path("pareto") / (args.experiment + (f"-{args.parent}" if args.parent else ""))
    out = Path(args.out) if args.out else default
    try:
        pareto_report(args.tracking_uri, args.experiment, args.parent, out)
    except ParetoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uri = resolve_uri(args.tracking_uri)
    print(ui_hint(uri, args.experiment, Store(uri).find_experiment(args.experiment) if is_server(uri) else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
