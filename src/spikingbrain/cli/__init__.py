"""The ``spikingbrain`` command: one entry point with subcommands."""

from __future__ import annotations

import argparse
import sys

from . import bench, convert, data, demo, distributed, model, serve, train
from . import eval as evaluation

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``spikingbrain`` command (built without importing torch)."""
    parser = argparse.ArgumentParser(prog="spikingbrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    model.register_generate(sub)
    model.register_info(sub)
    demo.register(sub)
    bench.register(sub)
    convert.register_convert(sub)
    train.register(sub)
    model.register_export(sub)
    distributed.register(sub)
    evaluation.register(sub)
    data.register(sub)
    evaluation.register_spikes(sub)
    convert.register_quantize(sub)
    serve.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``spikingbrain`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
