"""Copy a trained SpikingBrain folder with its GLA layers switched to another state update (a warm start for training).

Usage: .venv/bin/python scripts/switch_gla_update.py SOURCE OUT [--update delta]
Every weight is kept; switching to the delta rule adds each GLA layer's ``beta_proj`` at zero (write strength 1/2),
as a conversion would. The folder's outputs change (unit-length q and k, corrections instead of sums), so train it
before use, e.g. with a distill stage whose ``student`` is OUT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from spikingbrain.model.checkpoint import copy_tokenizer_files, refuse_non_empty
from spikingbrain.model.config import GLA_UPDATES
from spikingbrain.model.mixers import GatedLinearAttention
from spikingbrain.model.modeling import SpikingBrainForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a SpikingBrain model folder")
    parser.add_argument("out", help="folder to write (must not exist or be empty)")
    parser.add_argument("--update", choices=GLA_UPDATES, default="delta")
    args = parser.parse_args()
    source, out = Path(args.source), Path(args.out)
    refuse_non_empty(out)
    trained = SpikingBrainForCausalLM.from_pretrained(source)
    config = trained.config
    if config.gla_update == args.update:
        raise SystemExit(f"{source / 'config.json'}: gla_update is already {args.update!r}; nothing to switch")
    config.gla_update = args.update
    switched = SpikingBrainForCausalLM(config)
    missing, unexpected = switched.load_state_dict(trained.state_dict(), strict=False)
    for module in switched.modules():
        if isinstance(module, GatedLinearAttention) and module.delta:
            torch.nn.init.zeros_(module.beta_proj.weight)
            torch.nn.init.zeros_(module.beta_proj.bias)
    if unexpected or any(".beta_proj." not in name for name in missing):
        raise SystemExit(f"{source}: weights that do not carry over: missing {missing}, unexpected {unexpected}")
    switched.save_pretrained(out)
    copy_tokenizer_files(source, out)
    print(f"wrote {out}: gla_update={args.update!r}, new tensors {len(missing)}")


if __name__ == "__main__":
    main()
