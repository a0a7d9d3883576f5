"""``spikingbrain prefill``: sequence-parallel prefill of one prompt over several processes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..distributed.options import DEFAULT_TIMEOUT_S
from ..model.names import SHORT_NAMES

__all__ = ["register"]


def register(subparsers) -> None:
    """Add ``spikingbrain prefill``."""
    parser = subparsers.add_parser(
        "prefill", help="sequence-parallel prefill of one prompt over several processes (writes logits and the final cache)"
    )
    parser.add_argument("--model", default="default", help=f"model folder or short name ({', '.join(SHORT_NAMES)})")
    parser.add_argument("--text", required=True, help="text file holding the prompt")
    parser.add_argument("--nproc", type=int, default=2, help="local processes to start (ignored under torchrun)")
    parser.add_argument("--out", required=True, help="output .safetensors: key 'logits' (last position) and the cache tensors")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (each rank takes GPU LOCAL_RANK)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds a rank waits for the others")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_cmd_prefill)


def _cmd_prefill(args: argparse.Namespace) -> int:
    from ..distributed.prefill import prefill_on_ranks

    text = Path(args.text).expanduser()
    if not text.is_file():
        raise ValueError(f"--text {text}: no such file; pass a text file holding the prompt")
    report = prefill_on_ranks(args.model, text, args.out, args.device, args.nproc, args.timeout)
    if report is None:
        return 0  # under torchrun the last rank, which wrote the file, reports
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['tokens']} tokens on {report['ranks']} ranks in {report['seconds']:.3f} s; wrote {report['out']}")
        for r in report["per_rank"]:
            print(f"  rank {r['rank']}: {r['tokens']} tokens, {r['seconds']:.3f} s, {r['bytes_sent']} bytes sent {r['bytes_by_kind']}")
    return 0
