"""Pieces several commands share: argument types, common options, loading the compared models, printing results."""

from __future__ import annotations

import argparse
import json
import sys

from ..runtime.lengths import parse_lengths

__all__ = [
    "length_list",
    "float_list",
    "add_model_argument",
    "add_pair_arguments",
    "add_w8aspike_options",
    "candidates_from_args",
    "print_report",
    "print_benchmark",
    "print_result",
]


def length_list(text: str) -> list[int]:
    """Argument type: comma-separated token counts such as ``1024,4k`` (:func:`~spikingbrain.runtime.lengths.parse_lengths`)."""
    try:
        return parse_lengths(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def float_list(example: str, positive: str | None = None):
    """Argument type: comma-separated numbers such as ``example``; with ``positive`` (what they are), each must be > 0."""

    def parse(text: str) -> list[float]:
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers like {example}; got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
        if positive and any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{positive} must be > 0, got {text!r}")
        return values

    return parse


def add_model_argument(parser) -> None:
    """``--model``: a model folder or the embedded default."""
    parser.add_argument(
        "--model",
        default="default",
        help="model folder (SpikingBrain, official gla_swa, or Llama/Qwen2/Mistral) or 'default' (embedded SmolLM2-135M-Instruct)",
    )


def add_pair_arguments(p: argparse.ArgumentParser, out: str, name: str) -> None:
    """The options of a side-by-side benchmark: --model, --baseline, --threads, --seed, --out, --no-plot."""
    p.add_argument("--model", default="spikingbrain-smollm2", help="our model (folder or short name)")
    p.add_argument("--baseline", default="default", help="baseline Transformer run by transformers ('default': the teacher; 'none': skip)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help=f"folder for {name}.json and {name}.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def add_w8aspike_options(parser: argparse.ArgumentParser) -> None:
    """``--spike-query`` and ``--int8-kv``: W8ASpike's spiking options beyond the projections."""
    parser.add_argument("--spike-query", action="store_true", help="also spike the sliding-window query (W8ASpike)")
    parser.add_argument("--int8-kv", action="store_true", help="INT8 keys and values in softmax attention (W8ASpike)")


def candidates_from_args(args: argparse.Namespace, also: list[str] = ()):
    """Set the threads and load the models of :func:`add_pair_arguments`' options (and ``also``, further models of
    ours); print why a baseline was skipped."""
    from ..runtime.candidates import load_candidates
    from ..runtime.machine import set_threads

    set_threads(args.threads)
    candidates, notes = load_candidates(args.model, args.baseline, also)
    for note in notes:
        print(note, file=sys.stderr)
    return candidates, notes


def print_report(report: str, result: dict) -> None:
    """Print a benchmark's table and the files it wrote."""
    print(report)
    print(f"wrote {result['files']['json']}" + (f" and {result['files']['png']}" if result["files"].get("png") else ""))


def print_benchmark(report: str, result: dict) -> int:
    """:func:`print_report` of a side-by-side benchmark; exit status 1 when no model has any measured row."""
    print_report(report, result)
    return 0 if any(c["rows"] for c in result["candidates"].values()) else 1


def print_result(result: dict, as_json: bool) -> None:
    """Print a command's result as one JSON object, or as ``key: value`` lines."""
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
