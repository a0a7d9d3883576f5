"""``spikingbrain bench efficiency``: prefill GFLOP/s of a model (FLOPs counted analytically) as a fraction of a matmul peak measured in the same run.

The prefill is the one of ``spikingbrain bench kernels`` (``model(ids, use_cache=True,
logits_to_keep=1)``, streamed in steps of the config's ``streaming_chunk_size``, medians of
repeats), run on a randomly initialised model with the configuration of ``--model``: the
same shapes do the same work whatever the weights. FLOPs come from
:func:`spikingbrain.bench.flops.prefill_flops`. The fp32 GEMM peak is measured before and
after the prefills and the higher value is the reference, so a machine that gets busier
during the run does not flatter the fraction.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .kernels import _bench_prefill, _bracketed, _fmt_len, _int_list
from .kernels import plot as plot_prefill

__all__ = ["register", "run", "DEFAULT_LENGTHS", "TARGET", "TARGET_FROM"]

DEFAULT_LENGTHS = (1024, 4096, 16384, 65536)
TARGET = 0.50
TARGET_FROM = 16384  # the target applies at this length and beyond


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``efficiency`` subcommand to the ``spikingbrain bench`` group."""
    p = subparsers.add_parser(
        "efficiency",
        help="prefill GFLOP/s of a model's configuration as a fraction of the measured fp32 matmul peak, per length",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", default="spikingbrain-smollm2", help="model whose configuration is timed (folder or short name)")
    p.add_argument("--lengths", type=_int_list, default=None, help="prefill lengths (default 1k,4k,16k,64k)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per length (median reported)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="stop repeating a length after this many seconds")
    p.add_argument("--peak-size", type=_int_list, default=[4096, 2048, 2048], help="GEMM M,K,N of the matmul peak")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-efficiency", help="folder for efficiency.json and efficiency.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.set_defaults(func=_cmd_efficiency)
    return p


def _cmd_efficiency(args: argparse.Namespace) -> int:
    """Handler of ``spikingbrain bench efficiency``."""
    result = run(args)
    print(format_report(result))
    print(f"wrote {result['files']['json']}" + (f" and {result['files']['png']}" if result["files"].get("png") else ""))
    return 0


def run(args: argparse.Namespace) -> dict:
    """Measure the peak and the prefills described by ``args``; write efficiency.json (and .png); return the result."""
    from ..model.loading import load_model
    from .common import command_line, load_average, machine_info, matmul_peak, progress, set_threads, write_json
    from .report import thread_env

    threads = set_threads(args.threads)
    if len(args.peak_size) != 3:
        raise ValueError(f"--peak-size needs M,K,N (three integers), got {args.peak_size}")
    lengths = sorted(set(args.lengths or DEFAULT_LENGTHS))
    config = load_model(args.model).config
    limit = config.max_sequence_length
    if limit is not None and max(lengths) > limit:
        raise ValueError(f"{args.model}: length {max(lengths)} exceeds max_sequence_length={limit} (config.json); drop it")
    started, load_start = time.time(), load_average()
    settings = argparse.Namespace(seed=args.seed, repeats=args.repeats, max_seconds=args.max_seconds, ref_length=lengths[0])
    with progress(2 + len(lengths) + _bracketed(lengths, lengths[0]), "bench efficiency") as bar:
        bar.set_postfix_str("matmul peak")
        peak_start = matmul_peak(*args.peak_size)
        bar.update(1)
        prefill = _bench_prefill(settings, config, lengths, bar)
        bar.set_postfix_str("matmul peak")
        peak_end = matmul_peak(*args.peak_size)
        bar.update(1)
    peak = max(peak_start["gflops"], peak_end["gflops"])
    for row in prefill:
        row["fraction_of_peak"] = row["gflops"] / peak
    judged = [row for row in prefill if row["length"] >= TARGET_FROM]
    result = {
        "benchmark": "efficiency",
        "argv": command_line(),
        "model_ref": str(args.model),
        "machine": {**machine_info(), "torch_threads": threads},
        "thread_env": thread_env(),
        "wall_seconds": time.time() - started,
        "load_average": {"start": load_start, "end": load_average()},
        "settings": {"lengths": lengths, "repeats": args.repeats, "max_seconds": args.max_seconds,
                     "window": config.sliding_window, "streaming_chunk_size": config.streaming_chunk_size,
                     "weights": "random, with the configuration of the model"},
        "model": {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers, "layer_mixers": config.layer_mixers},
        "peak": {"gflops": peak, "start": peak_start, "end": peak_end},
        "prefill": prefill,
        "target": {
            "name": f"achieved GFLOP/s / matmul peak at every length >= {_fmt_len(TARGET_FROM)}",
            "target": TARGET,
            "values": {str(row["length"]): row["fraction_of_peak"] for row in judged},
            "pass": bool(judged) and all(row["fraction_of_peak"] >= TARGET for row in judged),
            "evaluated": bool(judged),
        },
    }
    out = Path(args.out)
    result["files"] = {"json": str(out / "efficiency.json")}
    if not args.no_plot:
        result["files"]["png"] = str(plot_prefill(result, out / "efficiency.png"))
    write_json(out / "efficiency.json", result)
    return result


def format_report(result: dict) -> str:
    """The readable table of an efficiency result."""
    peak = result["peak"]
    lines = [
        f"model {result['model_ref']}: {result['model']['num_hidden_layers']} layers, hidden {result['model']['hidden_size']}, "
        f"window {result['settings']['window']}; {result['machine']['torch_threads']} threads",
        f"matmul peak (fp32 {'x'.join(map(str, peak['start']['shape']))}): {peak['gflops']:.1f} GFLOP/s "
        f"(start {peak['start']['gflops']:.1f}, end {peak['end']['gflops']:.1f})",
        f"{'T':>7} {'seconds':>9} {'tokens/s':>10} {'GFLOP/s':>9} {'% peak':>7} {'cpu/wall':>9}",
    ]
    for r in result["prefill"]:
        lines.append(f"{_fmt_len(r['length']):>7} {r['seconds']:9.2f} {r['tokens_per_s']:10.1f} {r['gflops']:9.1f} "
                     f"{100 * r['fraction_of_peak']:6.1f}% {r['cpu_per_wall']:9.2f}")
    t = result["target"]
    verdict = ("PASS" if t["pass"] else "MISS") if t["evaluated"] else f"not evaluated (no length >= {_fmt_len(TARGET_FROM)})"
    lines.append(f"{t['name']} >= {t['target']:.2f}: {verdict}")
    lines.append(f"load average: start {result['load_average']['start']}, end {result['load_average']['end']}")
    return "\n".join(lines)
