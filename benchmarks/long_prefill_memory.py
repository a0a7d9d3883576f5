"""Peak memory of a streaming prefill of a very long prompt on a SmolLM2-sized random hybrid model.

Usage: python benchmarks/long_prefill_memory.py --tokens 1048576 [--window 2048] [--json out.json]
Prints tokens, seconds, tokens/s, peak resident memory of the process, and the cache size.
Run each length in its own process: peak RSS is per process.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=8192, help="streaming prefill chunk (tokens)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)

    config = SpikingBrainConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, sliding_window=args.window,
        rope_theta=1e5, streaming_chunk_size=args.chunk,
    )
    torch.manual_seed(0)
    model = SpikingBrainForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    baseline = peak_rss_bytes()
    cache = model.new_cache()
    start = time.perf_counter()
    print(f"prefilling {args.tokens} tokens in one model call (streamed in chunks of {args.chunk})", file=sys.stderr)
    with torch.inference_mode():
        out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - start
    result = {
        "tokens": args.tokens,
        "window": args.window,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(args.tokens / seconds, 1),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_prefill_bytes": baseline,
        "cache_bytes": cache.nbytes(),
        "last_logits_finite": bool(torch.isfinite(out.logits).all()),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
