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

import time
from pathlib import Path

from ..runtime.lengths import format_length
from .kernels import plot as plot_prefill
from .kernels import reference_measured_twice, time_prefill

__all__ = ["run", "format_report", "DEFAULT_LENGTHS", "TARGET", "TARGET_FROM"]

DEFAULT_LENGTHS = (1024, 4096, 16384, 65536)
TARGET = 0.50
TARGET_FROM = 16384  # the target applies at this length and beyond


def run(
    model_ref: str,
    out: str | Path,
    lengths: list[int] | None = None,
    repeats: int = 3,
    max_seconds: float = 30.0,
    peak_size: list[int] = (4096, 2048, 2048),
    threads: int | None = None,
    seed: int = 0,
    plot_png: bool = True,
) -> dict:
    """Measure the peak and the prefills of ``model_ref``'s configuration; write efficiency.json (and .png); return the result."""
    from ..model.loading import load_model
    from ..runtime.machine import load_average, machine_info, set_threads, thread_env
    from ..runtime.progress import progress
    from ..runtime.records import command_line, write_json
    from .common import matmul_peak

    threads = set_threads(threads)
    if len(peak_size) != 3:
        raise ValueError(f"--peak-size needs M,K,N (three integers), got {peak_size}")
    lengths = sorted(set(lengths or DEFAULT_LENGTHS))
    config = load_model(model_ref).config
    limit = config.max_sequence_length
    if limit is not None and max(lengths) > limit:
        raise ValueError(f"{model_ref}: length {max(lengths)} exceeds max_sequence_length={limit} (config.json); drop it")
    started, load_start = time.time(), load_average()
    with progress(2 + len(lengths) + reference_measured_twice(lengths, lengths[0]), "bench efficiency") as bar:
        bar.set_postfix_str("matmul peak")
        peak_start = matmul_peak(*peak_size)
        bar.update(1)
        prefill = time_prefill(config, lengths, bar, seed, repeats, max_seconds, ref_length=lengths[0])
        bar.set_postfix_str("matmul peak")
        peak_end = matmul_peak(*peak_size)
        bar.update(1)
    peak = max(peak_start["gflops"], peak_end["gflops"])
    for row in prefill:
        row["fraction_of_peak"] = row["gflops"] / peak
    judged = [row for row in prefill if row["length"] >= TARGET_FROM]
    result = {
        "benchmark": "efficiency",
        "argv": command_line(),
        "model_ref": str(model_ref),
        "machine": {**machine_info(), "torch_threads": threads},
        "thread_env": thread_env(),
        "wall_seconds": time.time() - started,
        "load_average": {"start": load_start, "end": load_average()},
        "settings": {"lengths": lengths, "repeats": repeats, "max_seconds": max_seconds,
                     "window": config.sliding_window, "streaming_chunk_size": config.streaming_chunk_size,
                     "weights": "random, with the configuration of the model"},
        "model": {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers, "layer_mixers": config.layer_mixers},
        "peak": {"gflops": peak, "start": peak_start, "end": peak_end},
        "prefill": prefill,
        "target": {
            "name": f"achieved GFLOP/s / matmul peak at every length >= {format_length(TARGET_FROM)}",
            "target": TARGET,
            "values": {str(row["length"]): row["fraction_of_peak"] for row in judged},
            "pass": bool(judged) and all(row["fraction_of_peak"] >= TARGET for row in judged),
            "evaluated": bool(judged),
        },
    }
    out = Path(out)
    result["files"] = {"json": str(out / "efficiency.json")}
    if plot_png:
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
        lines.append(f"{format_length(r['length']):>7} {r['seconds']:9.2f} {r['tokens_per_s']:10.1f} {r['gflops']:9.1f} "
                     f"{100 * r['fraction_of_peak']:6.1f}% {r['cpu_per_wall']:9.2f}")
    t = result["target"]
    verdict = ("PASS" if t["pass"] else "MISS") if t["evaluated"] else f"not evaluated (no length >= {format_length(TARGET_FROM)})"
    lines.append(f"{t['name']} >= {t['target']:.2f}: {verdict}")
    lines.append(f"load average: start {result['load_average']['start']}, end {result['load_average']['end']}")
    return "\n".join(lines)
