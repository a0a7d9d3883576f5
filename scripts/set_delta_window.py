"""Write a copy of a delta file whose model serves with another sliding window (a setting, not a weight).

Usage: .venv/bin/python scripts/set_delta_window.py DELTA OUT --window 4096
Every tensor and metadata entry is kept. The config's ``sliding_window`` becomes WINDOW, and the
metadata records the window the delta was trained with as ``trained_sliding_window`` (kept when
the file has one already). A folder's window is its ``config.json`` key ``sliding_window``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spikingbrain.model.checkpoint import CheckpointError
from spikingbrain.model.shipped import read_delta, write_delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("delta", help="a delta file (spikingbrain train writes delta.safetensors)")
    parser.add_argument("out", help="the file to write (must not exist)")
    parser.add_argument("--window", type=int, required=True, help="keys each sliding-window query sees besides its own")
    args = parser.parse_args()
    delta, out = Path(args.delta), Path(args.out)
    if args.window < 1:
        parser.error(f"--window {args.window}: give a window of at least 1 key")
    if out.exists():
        parser.error(f"{out}: exists; give a new file name (the delta is never overwritten)")
    try:
        config, teacher, tensors, extra = read_delta(delta)
    except CheckpointError as err:
        raise SystemExit(str(err)) from None
    if "sliding_window" not in config:
        raise SystemExit(f"{delta}: its config has no sliding_window; the model has no sliding-window layers to change")
    extra.setdefault("trained_sliding_window", config["sliding_window"])
    write_delta(out, tensors, {**config, "sliding_window": args.window}, teacher, extra)
    print(f"{out}: sliding_window {config['sliding_window']} -> {args.window} (trained with {extra['trained_sliding_window']})")


if __name__ == "__main__":
    main()
