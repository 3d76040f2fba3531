"""`cap` command line.

    cap train --config FILE [--out DIR] [key=value ...]     a run (under torchrun: one rank of a DDP job)
    cap train --resume RUN_DIR                              continue a run from its newest good checkpoint
    cap sync RUN_DIR                                        send tracking records kept while a server was away
    cap export RUN_DIR [--format F] [--round-to K]          the compact model (plain layers) + arch.json
    cap sweep SWEEP.yaml [--address A] [--storage DIR]      Ray Tune over tau/alpha/beta (see sweeps/)
    cap pareto --experiment NAME [--parent RUN_ID]          Pareto fronts of runs tracked in MLflow
    cap ui [--experiment NAME] [--port 5000]                the MLflow UI on cap's store, with links to cap's views
    cap submit --cluster slurm/x.yaml [--wait] -- train|sweep ...   the same commands as SLURM jobs
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cap.engine.config import ConfigError, load_config
from cap.launch import EXIT_PREEMPTED

EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for a Ctrl-C'd command"""


def _train(args: argparse.Namespace) -> int:
    from cap.data import DataError
    from cap.engine.checkpoint import CheckpointError, DiskFullError
    from cap.engine.distributed import RankMismatchError
    from cap.engine.run import Preempted, TrainingDiverged, resume, run
    from cap.engine.saved_config import restore_config

    try:
        if args.resume is not None:
            if args.config is not None or args.out is not None or args.overrides or args.overwrite:
                raise ConfigError("--resume continues a run with the configuration it was started with; "
                                  "--config, --out, --overwrite and key=value overrides cannot be combined with it")
            if args.restore_config:
                if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would rewrite the same file
                    raise ConfigError("--restore-config rewrites a file: run it once without torchrun "
                                      "(`cap train --resume RUN_DIR --restore-config`), then resume under torchrun")
                restore_config(Path(args.resume))
            resume(args.resume)
        else:
            if args.restore_config:
                raise ConfigError("--restore-config goes with --resume RUN_DIR")
            run(load_config(args.config, args.overrides), args.out, overwrite=args.overwrite)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RankMismatchError, TrainingDiverged, DiskFullError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Preempted as exc:
        print(f"\n{exc}", file=sys.stderr)  # on a line of its own, not after the progress bar's cleared line
        return EXIT_INTERRUPTED if exc.signal_name == "SIGINT" else EXIT_PREEMPTED
    except KeyboardInterrupt:  # a Ctrl-C before training began, or the second one
        print("\ninterrupted: stopped at once; the run folder keeps its last checkpoint, if it had one",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _sync(args: argparse.Namespace) -> int:
    from cap.engine.console import console
    from cap.tracking import TrackingFileError, sync_pending

    run_dir = Path(args.run_dir)
    try:
        sent = sync_pending(run_dir, log=console)
    except (FileNotFoundError, TrackingFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"sent {sent} pending tracking operations from {run_dir}")
    left = sorted(run_dir.glob("tracking_pending*.jsonl"))
    if left:  # the server is still away: say so in the exit status, so scripts can retry
        print(f"error: {', '.join(str(f) for f in left)} still hold operations; the tracking server did not "
              "take them (is it reachable?)", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    import json

    from cap.deploy import ExportError, export

    out = Path(args.out) if args.out else Path(args.run_dir) / "export"
    try:
        path = export(args.run_dir, out, args.format, args.round_to)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:  # the TorchScript or ONNX exporter itself failed
        print(f"error: {args.format} export of {args.run_dir} failed: {exc}", file=sys.stderr)
        return 1
    arch = json.loads((out / "arch.json").read_text())
    print(f"wrote {path} and {out / 'arch.json'}: {arch['macs']:,} MACs, {arch['params']:,} params per image"
          + (f" (widths rounded up to multiples of {args.round_to})" if args.round_to else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cap", description="Complexity-aware training: ResNets that prune their own units and blocks.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="one training run",
        description="Train a gated ResNet; units and blocks whose gates reach 0 are removed during training. "
                    "Writes config.yaml, summary.json, history.json and model.pt to the run folder.")
    train.add_argument("--config", help="experiment YAML (keys: see docs/config.md); defaults apply without it")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its newest good checkpoint (same process count)")
    train.add_argument("--out", help="run folder (default: runs/<time>-<model>-<data>-tau<tau>); one that holds "
                                     "a run already is refused unless --overwrite")
    train.add_argument("--overwrite", action="store_true",
                       help="with --out: remove the run that folder holds (its checkpoints and results) first")
    train.add_argument("--restore-config", action="store_true",
                       help="with --resume: write config.yaml back from the configuration stored in the newest "
                            "good checkpoint (the old file is kept as config.yaml.replaced-<time>)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. prune.tau=0.5 prune.alpha=1 train.epochs=4 seed=1")
    train.set_defaults(func=_train)
    sync = sub.add_parser("sync", help="send tracking records that a run kept while its MLflow server was away",
                          description="Replays RUN_DIR/tracking_pending.jsonl to the run's MLflow server.")
    sync.add_argument("run_dir", metavar="RUN_DIR")
    sync.set_defaults(func=_sync)
    exp = sub.add_parser("export", help="write the compact model of a finished run",
                         description="The run's deterministic network as plain conv/BN/linear layers: "
                                     "arch.json + model.pt (state_dict), plus model.ts, model.onnx or model.pt2.")
    exp.add_argument("run_dir", metavar="RUN_DIR")
    exp.add_argument("--format", choices=["state_dict", "torchscript", "onnx", "exported_program"],
                     default="state_dict")
    exp.add_argument("--out", help="output folder (default: RUN_DIR/export)")
    exp.add_argument("--round-to", type=int, metavar="K",
                     help="pad kept internal widths up to a multiple of K with zero channels (same outputs, "
                          "more MACs; tensor-core friendly shapes)")
    exp.set_defaults(func=_export)
    for name, (_, text) in DELEGATED.items():  # listed in --help; main() hands their arguments over whole
        sub.add_parser(name, help=text, add_help=False)
    return parser


# Commands with their own argument parsers, in their own modules (imported only when used).
DELEGATED = {
    "sweep": ("cap.cli.sweep", "Ray Tune sweep of tau/alpha/beta (sweeps/*.yaml)"),
    "pareto": ("cap.cli.pareto", "Pareto fronts and hypervolumes of runs tracked in MLflow"),
    "submit": ("cap.cli.submit", "run `cap train` or `cap sweep` as a SLURM job (submitit)"),
    "ui": ("cap.cli.ui", "the MLflow UI on cap's store, with links that open cap's views"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
