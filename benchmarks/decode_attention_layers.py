"""The decode-attention kernel over many layers' window caches, as a decode step meets them: out of the processor's caches.

Usage: python benchmarks/decode_attention_layers.py [--layers 20] [--keys 4609] [--rounds 10] [--threads 2]
One query (9 heads, 3 key/value heads of 64, the shipped model's shapes) attends each layer's ring of
``--keys`` keys in turn, stored head-major in fp32, fp16 and as int8 rows; before each timed round a
160 MB pass over other memory evicts the rings, as a decode step's weights do. Prints the
milliseconds per round (all layers) for each storage, and the same rounds back to back.
"""

from __future__ import annotations

import argparse
import time

import torch

from spikingbrain.ops.attention import Int8Rows, causal_attention
from spikingbrain.runtime.machine import set_threads


def rings(storage, layers: int, keys: int, generator) -> list[tuple]:
    """``layers`` (keys, values) pairs of ``[1, keys, 3, 64]`` head-major rows in ``storage`` (a dtype or ``"int8"``)."""
    def one():
        rows = torch.randn(1, 3, keys, 64, generator=generator).transpose(1, 2)
        return Int8Rows.quantized(rows) if storage == "int8" else rows.to(storage)

    return [(one(), one()) for _ in range(layers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--keys", type=int, default=4609)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 1, 9, 64, generator=generator)
    evict = torch.randn(40_000_000)
    for storage in (torch.float32, torch.float16, "int8"):
        layers = rings(storage, args.layers, args.keys, generator)
        cold = 0.0
        for round_ in range(args.rounds + 1):  # the first round warms up
            evict.sum()
            start = time.perf_counter()
            for keys, values in layers:
                causal_attention(query, keys, values)
            cold += (time.perf_counter() - start) if round_ else 0.0
        start = time.perf_counter()
        for _ in range(args.rounds):
            for keys, values in layers:
                causal_attention(query, keys, values)
        back_to_back = (time.perf_counter() - start) / args.rounds
        name = storage if isinstance(storage, str) else str(storage).removeprefix("torch.")
        print(f"{name:8s} after eviction {1e3 * cold / args.rounds:6.2f} ms per round   back to back {1e3 * back_to_back:6.2f} ms")


if __name__ == "__main__":
    main()
