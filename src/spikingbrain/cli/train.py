"""``spikingbrain train``: conversion training from a config file, on one process or under ``torchrun``."""

from __future__ import annotations

import argparse
import json
import os

from ..distributed.options import DEFAULT_TIMEOUT_S, PARALLEL_KINDS

__all__ = ["register", "config_from_args"]


def config_from_args(args: argparse.Namespace):
    """The ``TrainConfig`` of a ``spikingbrain train`` command line (file plus ``--set``/``--out`` overrides)."""
    from ..train.config import load_train_config

    overrides = list(args.set)
    if args.out:
        overrides.append(f"out={args.out}")
    return load_train_config(args.config, overrides)


def _run(args: argparse.Namespace) -> int:
    from ..distributed.comm import launched_by_torchrun

    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not args.plot:
        from ..distributed.training import train_on_this_rank

        summary = train_on_this_rank(config_from_args(args), args.resume, not args.no_progress, args.parallel, args.timeout)
        if summary is not None:
            print(json.dumps(summary, indent=1))
        return 0
    from ..train.report import plot_training_curve
    from ..train.trainer import Trainer

    config = config_from_args(args)
    if args.plot:
        for path in plot_training_curve(config.out):
            print(f"wrote {path}")
        return 0
    if args.export_latest:
        print(f"wrote {Trainer(config, resume=True, progress=False).export_latest_checkpoint()}")
        return 0
    summary = Trainer(config, resume=args.resume, progress=not args.no_progress).run()
    print(json.dumps(summary, indent=1))
    return 0


def register(subparsers) -> None:
    """Add ``spikingbrain train`` to the CLI."""
    parser = subparsers.add_parser("train", help="conversion training (attention transfer, distillation) from a YAML/TOML config")
    parser.add_argument("config", help="training config (.yaml, .yml or .toml); see configs/ for examples")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. stages.0.steps=20")
    parser.add_argument("--out", default=None, help="run folder (overrides the config's 'out')")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--plot", action="store_true", help="only (re)draw the run's curve.png/curve.json from its metrics")
    parser.add_argument("--export-latest", action="store_true",
                        help="write the latest checkpoint's student (delta and model folder) to OUT/at-step-N without training")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="under torchrun: seconds a rank waits for the others")
    parser.add_argument(
        "--parallel", choices=PARALLEL_KINDS, default="ddp",
        help="under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2: parameters, gradients and optimizer state sharded over the ranks)",
    )
    parser.set_defaults(func=_run)
