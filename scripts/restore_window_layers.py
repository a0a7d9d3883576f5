"""Write a copy of a delta file in which chosen GLA layers are the teacher's sliding-window attention again.

Usage: .venv/bin/python scripts/restore_window_layers.py DELTA OUT --layers 9[,15]
Each named layer must be a GLA layer of the delta's config. It becomes an ``swa`` layer (the config's
``sliding_window`` and ``keep_first_tokens``), and every tensor the delta holds for that layer's
attention is left out (gate, output norm, write strength, adapters or weights of q/k/v/o), so the
rebuilt model runs the teacher's own attention there; the layer's MLP and everything else are kept.
The metadata lists the layers restored so far as ``restored_window_layers``. Measured use:
docs/reading.md ("Fewer GLA layers").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spikingbrain.model.checkpoint import CheckpointError
from spikingbrain.model.shipped import read_delta_to_copy, write_delta


def parse_layers(text: str) -> list[int]:
    """``"9,15"`` -> ``[9, 15]`` (argparse type)."""
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0-indexed layer numbers separated by commas, e.g. 9,15") from None
    if not layers:
        raise argparse.ArgumentTypeError("give at least one layer, e.g. --layers 9")
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("delta", help="a delta file (spikingbrain train writes delta.safetensors)")
    parser.add_argument("out", help="the file to write (must not exist)")
    parser.add_argument("--layers", type=parse_layers, required=True, help="0-indexed GLA layers to restore, e.g. 9,15")
    args = parser.parse_args()
    delta, out = Path(args.delta), Path(args.out)
    try:
        config, teacher, tensors, extra = read_delta_to_copy(delta, out)
    except CheckpointError as err:
        raise SystemExit(str(err)) from None
    mixers = list(config["layer_mixers"])
    for layer in args.layers:
        if layer >= len(mixers):
            raise SystemExit(f"{delta}: --layers {layer}: the model has layers 0..{len(mixers) - 1}")
        if mixers[layer] != "gla":
            raise SystemExit(f"{delta}: layer {layer} is {mixers[layer]!r}, not a GLA layer; give layers whose mixer is 'gla'")
        mixers[layer] = "swa"
    prefixes = tuple(f"model.layers.{layer}.attn." for layer in args.layers)
    kept = {name: tensor for name, tensor in tensors.items() if not name.startswith(prefixes)}
    extra["restored_window_layers"] = sorted({*extra.get("restored_window_layers", []), *args.layers})
    write_delta(out, kept, {**config, "layer_mixers": mixers}, teacher, extra)
    print(f"{out}: layers {args.layers} are the teacher's sliding-window attention ({len(tensors) - len(kept)} tensors left out); "
          f"{mixers.count('gla')} GLA layers remain")


if __name__ == "__main__":
    main()
