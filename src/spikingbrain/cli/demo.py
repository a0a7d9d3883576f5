"""``spikingbrain demo`` (``make demo``): the main job, ours against the teacher."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..train.options import QUICK_CONVERSION_STEPS
from .common import length_list

__all__ = ["register"]


def register(subparsers) -> None:
    """Add ``spikingbrain demo``."""
    p = subparsers.add_parser("demo", help="the main job: quality, long-context speed and memory of ours against the teacher",
                              description="``spikingbrain demo`` (``make demo``): the main job on the embedded default, offline, in about ten minutes on 2 cores.")
    p.add_argument("--model", default="auto",
                   help="our model (folder or short name); 'auto': the shipped conversion of the default teacher, "
                        "otherwise a quick conversion of --teacher made in <out>/quick-conversion")
    p.add_argument("--convert-steps", type=int, default=QUICK_CONVERSION_STEPS,
                   help="distillation steps of a quick conversion (1024 tokens each; 0: calibration only)")
    p.add_argument("--also", action="append", default=None, metavar="MODEL",
                   help="a further model whose perplexity, pass keys and samples are reported beside ours (repeatable); "
                        "default 'auto': the other shipped conversions of --teacher; 'none': no further model")
    p.add_argument("--teacher", default="default", help="the Transformer it is compared with, run by transformers (SDPA)")
    p.add_argument("--out", default="runs/demo", help="report folder (report.md, demo.json, PNGs)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds the whole demo may take (default 600, with --long 3600); TTFT lengths that would pass it are skipped")
    p.add_argument("--long", action="store_true", help="longer runs: TTFT to 256k (ours) and 32k (teacher), passkey to 32k, decode to 256k")
    p.add_argument("--ttft-lengths", type=length_list, default=None, help="TTFT lengths for ours (default 1k,4k,16k,64k)")
    p.add_argument("--baseline-lengths", type=length_list, default=None, help="TTFT lengths for the teacher (default 1k..16k)")
    p.add_argument("--passkey-lengths", type=length_list, default=None, help="pass-key prompt lengths (default 1k,4k)")
    p.add_argument("--decode-contexts", type=length_list, default=None, help="decode contexts (default 1k,16k,64k)")
    p.add_argument("--ppl-tokens", type=int, default=8192, help="held-out tokens scored for perplexity")
    p.add_argument("--ppl-context", type=int, default=2048, help="perplexity window")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per sample generation")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import LONG, QUICK, format_summary, run_demo

    preset = LONG if args.long else QUICK
    settings = {
        "ttft": args.ttft_lengths or preset["ttft"],
        "baseline_ttft": args.baseline_lengths or preset["baseline_ttft"],
        "passkey": args.passkey_lengths or preset["passkey"],
        "decode": args.decode_contexts or preset["decode"],
        "ppl_tokens": args.ppl_tokens, "ppl_context": args.ppl_context, "max_new_tokens": args.max_new_tokens,
        "budget_s": args.budget or (3600.0 if args.long else 600.0), "long": bool(args.long),
        "convert_steps": args.convert_steps,
        "also": [ref for ref in (args.also or ["auto"]) if ref != "none"],
    }
    result = run_demo(args.model, args.teacher, Path(args.out), settings, args.threads)
    print()
    print(format_summary(result))
    print(f"\nreport: {result['files']['markdown']}" + (" (partial)" if result["partial"] else ""))
    return 0 if not result["partial"] else 1
