"""Write a copy of a delta file whose model serves with another sliding window or sink count (settings, not weights).

Usage: .venv/bin/python scripts/set_delta_window.py DELTA OUT [--window 4096] [--keep-first-tokens 512]
Every tensor and metadata entry is kept. The config's ``sliding_window`` becomes WINDOW and its
``keep_first_tokens`` (the first positions every sliding-window query keeps seeing) becomes N;
the metadata records the values the delta was trained with as ``trained_sliding_window`` and
``trained_keep_first_tokens`` (kept when the file has them already). A folder's settings are its
``config.json`` keys of the same names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spikingbrain.model.checkpoint import CheckpointError
from spikingbrain.model.shipped import read_delta_to_copy, write_delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("delta", help="a delta file (spikingbrain train writes delta.safetensors)")
    parser.add_argument("out", help="the file to write (must not exist)")
    parser.add_argument("--window", type=int, help="keys each sliding-window query sees besides its own")
    parser.add_argument(
        "--keep-first-tokens", type=int, help="first positions every sliding-window query also sees (0: a plain window)"
    )
    args = parser.parse_args()
    delta, out = Path(args.delta), Path(args.out)
    if args.window is None and args.keep_first_tokens is None:
        parser.error("give --window, --keep-first-tokens or both (nothing to change otherwise)")
    if args.window is not None and args.window < 1:
        parser.error(f"--window {args.window}: give a window of at least 1 key")
    if args.keep_first_tokens is not None and args.keep_first_tokens < 0:
        parser.error(f"--keep-first-tokens {args.keep_first_tokens}: give 0 or more first tokens")
    try:
        config, teacher, tensors, extra = read_delta_to_copy(delta, out)
    except CheckpointError as err:
        raise SystemExit(str(err)) from None
    if "sliding_window" not in config:
        raise SystemExit(f"{delta}: its config has no sliding_window; the model has no sliding-window layers to change")
    given = {"sliding_window": args.window, "keep_first_tokens": args.keep_first_tokens}
    changes = {key: value for key, value in given.items() if value is not None}
    for key in changes:
        extra.setdefault(f"trained_{key}", config.get(key, 0))
    write_delta(out, tensors, {**config, **changes}, teacher, extra)
    for key, value in changes.items():
        print(f"{out}: {key} {config.get(key, 0)} -> {value} (trained with {extra[f'trained_{key}']})")


if __name__ == "__main__":
    main()
