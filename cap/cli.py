"""`cap` command line: `cap train --config FILE [--out DIR] [key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from cap.config import ConfigError, load_config


def _train(args: argparse.Namespace) -> int:
    from cap.data import DataError
    from cap.trainer import run

    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, args.out)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    train.add_argument("--out", help="run folder (default: runs/<time>-<model>-<data>-tau<tau>)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. prune.tau=0.5 prune.alpha=1 train.epochs=4 seed=1")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
