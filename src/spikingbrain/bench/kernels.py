"""``spikingbrain bench kernels``: GLA kernels side by side and long-context prefill against the matmul peak.

One run measures, on the same machine and thread count:

1. the fp32 GEMM peak (``--peak-size``, median of repeats; measured at the start and at
   the end, the higher value is the reference, so a busy machine does not flatter the
   efficiency figure);
2. ``chunk_gla`` against the token-by-token ``naive_gla`` and the step-wise
   ``recurrent_gla`` with the model's head shapes, time per call and speed-up ratios;
3. prefill tokens/s of a randomly initialised hybrid model (SmolLM2-135M shapes by default)
   through ``model(ids, use_cache=True, logits_to_keep=1)`` under ``torch.inference_mode()``
   (streaming prefill in steps of ``--chunk`` tokens), and the achieved GFLOP/s from
   :func:`spikingbrain.bench.flops.prefill_flops` as a fraction of the peak.

It prints a table and the two targets (tokens/s at the longest length / at the reference
length >= 0.90; achieved / peak at the longest length >= 0.50) with PASS/MISS, and writes
``kernels.json`` and ``kernels.png`` to ``--out``.

The default window is 2048 (``--window``): SmolLM2 was trained with an 8k context and
long-context hybrids use 2K-4K windows (RecurrentGemma 2K, SpikingBrain-7B 4K at 7B scale).
At this width a key costs ``4 * hidden`` FLOPs per query, so a 4096 window would make the
window attention of the 15 SWA layers as costly as all projections together, and a
query at 64k would cost 1.25x one at 4k by construction; 2048 keeps the attention share
near a quarter and the 64k/4k work ratio at 0.94.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from ..runtime.lengths import format_length

__all__ = ["run", "format_report", "time_prefill", "reference_measured_twice", "plot", "DEFAULT_LENGTHS", "QUICK_LENGTHS"]

DEFAULT_LENGTHS = (1024, 4096, 16384, 65536)
QUICK_LENGTHS = (1024, 4096)
DEFAULT_GLA_LENGTHS = (512, 2048, 8192, 32768)
QUICK_GLA_LENGTHS = (512, 2048)
SCALING_TARGET = 0.90
EFFICIENCY_TARGET = 0.50


def _gla_inputs(length: int, heads: int, kv_heads: int, dim: int, seed: int):
    """Random GLA inputs shaped like the model's: ReLU features, log-sigmoid gates / 16."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, length, heads, dim, generator=gen).relu()
    k = torch.randn(1, length, kv_heads, dim, generator=gen).relu()
    v = torch.randn(1, length, kv_heads, dim, generator=gen)
    g = F.logsigmoid(torch.randn(1, length, kv_heads, dim, generator=gen)) / 16
    return q, k, v, g


def _bench_gla(config, lengths, bar, seed: int, repeats: int, max_seconds: float, naive_max_length: int) -> list[dict]:
    """Time chunk / recurrent / naive GLA per length; speed-ups are naive (or recurrent) time over chunk time."""
    import torch

    from ..ops import chunk_gla, naive_gla, recurrent_gla
    from .common import time_call
    from .flops import gla_mixing_flops

    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    rows = []
    for length in lengths:
        q, k, v, g = _gla_inputs(length, H, Hkv, D, seed)
        row: dict = {"length": length, "heads": H, "kv_heads": Hkv, "head_dim": D, "chunk_size": config.gla_chunk_size}
        outputs = {}
        C = config.gla_chunk_size
        sub = math.gcd(C, 16)  # as the model's GLA layer does
        kernels = [("chunk", lambda: chunk_gla(q, k, v, g, output_final_state=True, chunk_size=C, sub_chunk_size=sub))]
        if length <= naive_max_length:
            kernels += [
                ("recurrent", lambda: recurrent_gla(q, k, v, g, output_final_state=True)),
                ("naive", lambda: naive_gla(q, k, v, g, output_final_state=True)),
            ]
        with torch.inference_mode():
            for name, fn in kernels:
                bar.set_postfix_str(f"gla {name} T={length}")
                start = time.perf_counter()
                outputs[name] = fn()[0]  # the first call is timed too: the loops take seconds at 2k
                first = time.perf_counter() - start
                times = [first]
                if repeats > 1 and first < max_seconds:
                    more = time_call(fn, repeats=repeats - 1, warmup=0, max_seconds=max_seconds - first)
                    times += more["times_s"]
                row[f"{name}_s"] = statistics.median(times)
                row[f"{name}_runs"] = len(times)
                bar.update(1)
        flops = gla_mixing_flops(length, H, Hkv, D, D, config.gla_chunk_size)
        row["flops"] = flops
        row["chunk_gflops"] = flops / row["chunk_s"] / 1e9
        for name in ("naive", "recurrent"):
            if name in outputs:
                row[f"speedup_vs_{name}"] = row[f"{name}_s"] / row["chunk_s"]
                row[f"max_abs_diff_vs_{name}"] = float((outputs["chunk"].float() - outputs[name].float()).abs().max())
        rows.append(row)
    return rows


def time_prefill(config, lengths, bar, seed: int, repeats: int, max_seconds: float, ref_length: int) -> list[dict]:
    """Prefill tokens/s and achieved GFLOP/s of a random model at each length.

    The reference length is measured again after the longest one (when it is shorter) and
    its figures use the median of all its runs, so a machine that slows down or speeds up
    during the run does not bias the long/reference ratio. ``step_seconds`` are the times
    of the streaming steps of the last run; ``step_spread`` (slowest / fastest full step after the
    first, which also runs the causal prefix) is about 1 on a machine of constant speed.
    """
    import torch

    from ..model.modeling import SpikingBrainForCausalLM
    from ..runtime.machine import load_average
    from .common import time_call
    from .flops import prefill_flops

    bar.set_postfix_str("building model")
    torch.manual_seed(seed)
    model = SpikingBrainForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    inputs = {length: torch.randint(0, config.vocab_size, (1, length), generator=gen) for length in lengths}
    rows: dict[int, dict] = {}

    # Start times of the inner model's calls: one per streaming step of a long prefill.
    step_starts: list[float] = []
    model.model.register_forward_pre_hook(lambda module, inputs: step_starts.append(time.perf_counter()))

    def prefill(ids: torch.Tensor) -> None:
        step_starts.clear()
        model(ids, use_cache=True, logits_to_keep=1)
        step_starts.append(time.perf_counter())

    def measure(length: int, warmup: int) -> dict:
        bar.set_postfix_str(f"prefill T={length}")
        ids = inputs[length]
        timing = time_call(lambda: prefill(ids), repeats=repeats, warmup=warmup, max_seconds=max_seconds)
        bar.update(1)
        steps = [b - a for a, b in zip(step_starts, step_starts[1:])]  # of the last timed call
        return {**timing, "load_average": load_average(), "step_seconds": steps}

    with torch.inference_mode():
        model(inputs[min(lengths)], use_cache=True, logits_to_keep=1)
        for length in lengths:
            timing = measure(length, warmup=1 if length <= ref_length else 0)
            rows[length] = {
                "length": length,
                "times_s": timing["times_s"],
                "cpu_per_wall": timing["cpu_per_wall"],
                "load_average": timing["load_average"],
                "step_seconds": timing["step_seconds"],
            }
        if reference_measured_twice(lengths, ref_length):
            again = measure(ref_length, warmup=0)
            row = rows[ref_length]
            row["first_median_s"] = statistics.median(row["times_s"])
            row["again_median_s"] = again["median_s"]
            row["times_s"] = row["times_s"] + again["times_s"]
            row["load_average_again"] = again["load_average"]
    for length, row in rows.items():
        flops = prefill_flops(config, length, logits_to_keep=1)
        seconds = statistics.median(row["times_s"])
        full_steps = length // config.streaming_chunk_size if length > config.streaming_chunk_size else 1
        steady = row["step_seconds"][1:full_steps]  # full steps after the first all do the same work
        row["step_spread"] = max(steady) / min(steady) if len(steady) > 1 else None
        row.update(
            seconds=seconds,
            runs=len(row["times_s"]),
            tokens_per_s=length / seconds,
            flops=flops["total"],
            flops_by_kind=flops,
            gflops=flops["total"] / seconds / 1e9,
        )
    return [rows[length] for length in lengths]


def reference_measured_twice(lengths: list[int], ref_length: int) -> bool:
    """Whether the reference length is measured a second time, after the longest length."""
    return ref_length in lengths and max(lengths) > ref_length


def _targets(prefill: list[dict], peak_gflops: float, ref_length: int) -> dict:
    """The scaling and efficiency ratios with their targets."""
    by_length = {row["length"]: row for row in prefill}
    longest = max(by_length)
    ref = ref_length if ref_length in by_length and ref_length != longest else min(by_length)
    scaling = by_length[longest]["tokens_per_s"] / by_length[ref]["tokens_per_s"]
    efficiency = by_length[longest]["gflops"] / peak_gflops
    return {
        "scaling": {
            "name": f"tokens/s at {longest} / tokens/s at {ref}",
            "long_length": longest,
            "ref_length": ref,
            "value": scaling,
            "target": SCALING_TARGET,
            "pass": bool(scaling >= SCALING_TARGET),
        },
        "efficiency": {
            "name": f"achieved GFLOP/s at {longest} / matmul peak",
            "length": longest,
            "value": efficiency,
            "target": EFFICIENCY_TARGET,
            "pass": bool(efficiency >= EFFICIENCY_TARGET),
        },
    }


def run(
    config,
    out: str | Path,
    lengths: list[int] | None = None,
    gla_lengths: list[int] | None = None,
    ref_length: int = 4096,
    quick: bool = False,
    naive_max_length: int = 2048,
    threads: int | None = None,
    repeats: int = 3,
    max_seconds: float = 20.0,
    peak_size: list[int] = (4096, 2048, 2048),
    seed: int = 0,
    plot_png: bool = True,
) -> dict:
    """Time the matmul peak, the GLA kernels and the prefill of a random model with ``config``; write kernels.json (and .png)."""
    import torch

    from ..runtime.machine import load_average, machine_info, set_threads
    from ..runtime.progress import progress
    from ..runtime.records import command_line, write_json
    from .common import matmul_peak

    threads = set_threads(threads)
    lengths = sorted(set(lengths or (QUICK_LENGTHS if quick else DEFAULT_LENGTHS)))
    gla_lengths = sorted(set(gla_lengths or (QUICK_GLA_LENGTHS if quick else DEFAULT_GLA_LENGTHS)))
    if len(peak_size) != 3:
        raise ValueError(f"--peak-size needs M,K,N (three integers), got {peak_size}")
    repeats = min(repeats, 2) if quick else repeats
    n_gla_runs = sum(3 if t <= naive_max_length else 1 for t in gla_lengths)
    started = time.time()
    load_start = load_average()
    n_prefill_runs = len(lengths) + reference_measured_twice(lengths, ref_length)
    with progress(2 + n_gla_runs + n_prefill_runs, "bench kernels") as bar:
        bar.set_postfix_str("matmul peak")
        peak_start = matmul_peak(*peak_size, repeats=5 if not quick else 3)
        bar.update(1)
        gla = _bench_gla(config, gla_lengths, bar, seed, repeats, max_seconds, naive_max_length)
        prefill = time_prefill(config, lengths, bar, seed, repeats, max_seconds, ref_length)
        bar.set_postfix_str("matmul peak")
        peak_end = matmul_peak(*peak_size, repeats=5 if not quick else 3)
        bar.update(1)
    peak = max(peak_start["gflops"], peak_end["gflops"])
    for row in prefill:
        row["fraction_of_peak"] = row["gflops"] / peak
    result = {
        "benchmark": "kernels",
        "argv": command_line(),
        "machine": {**machine_info(), "torch_threads": threads},
        "wall_seconds": time.time() - started,
        "load_average": {"start": load_start, "end": load_average()},
        "settings": {
            "quick": bool(quick),
            "lengths": lengths,
            "gla_lengths": gla_lengths,
            "repeats": repeats,
            "max_seconds": max_seconds,
            "window": config.sliding_window,
            "attention_window": config.attention_window,
            "streaming_chunk_size": config.streaming_chunk_size,
            "gla_chunk_size": config.gla_chunk_size,
            "dtype": str(torch.get_default_dtype()).replace("torch.", ""),
        },
        "model": {
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "layer_mixers": config.layer_mixers,
        },
        "peak": {"gflops": peak, "start": peak_start, "end": peak_end},
        "gla_kernels": gla,
        "prefill": prefill,
        "targets": _targets(prefill, peak, ref_length),
    }
    out = Path(out)
    result["files"] = {"json": str(out / "kernels.json")}
    if plot_png:
        result["files"]["png"] = str(plot(result, out / "kernels.png"))
    write_json(out / "kernels.json", result)
    return result


def plot(result: dict, path: Path) -> Path:
    """Tokens/s and percent of the matmul peak against prefill length (log-x), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["prefill"]
    x = [r["length"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(x, [r["tokens_per_s"] for r in rows], "o-", color="tab:blue")
    ax1.set_ylabel("prefill tokens/s")
    ax1.set_ylim(bottom=0)
    ax2.plot(x, [100 * r["fraction_of_peak"] for r in rows], "o-", color="tab:green", label="achieved")
    ax2.axhline(100 * EFFICIENCY_TARGET, color="gray", ls="--", label="target 50 %")
    ax2.set_ylabel("% of measured fp32 matmul peak")
    ax2.set_ylim(0, 100)
    ax2.legend(loc="lower right")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [format_length(n) for n in x])
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(True, alpha=0.3)
    m, s = result["machine"], result["settings"]
    fig.suptitle(
        f"SpikingBrain prefill, {result['model']['num_hidden_layers']} layers hidden {result['model']['hidden_size']}, "
        f"window {s['window']}; {m['nproc']} cores, {m['torch_threads']} threads, peak {result['peak']['gflops']:.0f} GFLOP/s",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_report(result: dict) -> str:
    """The readable table of a result from :func:`run`."""
    m, s, peak = result["machine"], result["settings"], result["peak"]
    lines = [
        f"machine: {m['cpu']}, nproc {m['nproc']}, torch {m['torch']} with {m['torch_threads']} threads",
        f"matmul peak (fp32 {'x'.join(map(str, peak['start']['shape']))}): {peak['gflops']:.1f} GFLOP/s "
        f"(start {peak['start']['gflops']:.1f}, end {peak['end']['gflops']:.1f})",
        "",
        f"GLA kernels, H={result['model']['num_attention_heads']} Hkv={result['model']['num_key_value_heads']} "
        f"D={result['model']['head_dim']}, chunk {s['gla_chunk_size']} (ms per call)",
        f"{'T':>7} {'chunk':>10} {'recurrent':>10} {'naive':>10} {'chunk/naive':>12} {'chunk/recur':>12} {'chunk GF/s':>11}",
    ]
    for r in result["gla_kernels"]:
        def ms(key):
            return f"{1000 * r[key]:10.1f}" if key in r else f"{'-':>10}"

        def ratio(key):
            return f"{r[key]:11.1f}x" if key in r else f"{'-':>12}"

        lines.append(
            f"{format_length(r['length']):>7} {ms('chunk_s')} {ms('recurrent_s')} {ms('naive_s')} "
            f"{ratio('speedup_vs_naive')} {ratio('speedup_vs_recurrent')} {r['chunk_gflops']:11.2f}"
        )
    lines += [
        "",
        f"Prefill, random model: {result['model']['num_hidden_layers']} layers, hidden {result['model']['hidden_size']}, "
        f"window {s['window']}, streaming step {s['streaming_chunk_size']}, logits_to_keep=1",
        f"{'T':>7} {'seconds':>9} {'runs':>5} {'tokens/s':>10} {'GFLOP/token':>12} {'GFLOP/s':>9} {'% peak':>7} {'cpu/wall':>9} {'step spread':>12}",
    ]
    for r in result["prefill"]:
        lines.append(
            f"{format_length(r['length']):>7} {r['seconds']:9.2f} {r['runs']:5d} {r['tokens_per_s']:10.1f} "
            f"{r['flops'] / r['length'] / 1e9:12.4f} {r['gflops']:9.1f} {100 * r['fraction_of_peak']:6.1f}% {r['cpu_per_wall']:9.2f} "
            f"{'-' if r['step_spread'] is None else format(r['step_spread'], '.2f'):>12}"
        )
    for r in result["prefill"]:
        if "again_median_s" in r:
            lines.append(
                f"{format_length(r['length'])} was measured before and after the longer lengths: "
                f"{r['length'] / r['first_median_s']:.1f} and {r['length'] / r['again_median_s']:.1f} tokens/s; "
                f"the table uses the median of all {r['runs']} runs"
            )
    lines.append(
        "step spread: slowest / fastest streaming step of identical work (about 1.0 = the machine kept its speed)"
    )
    load = result.get("load_average") or {}
    lines.append(
        f"cpu/wall: process CPU seconds per wall second ({m['torch_threads']} = all threads busy); "
        f"load average at start {load.get('start')}, end {load.get('end')}"
    )
    lines += ["", f"{'target':<46} {'measured':>9} {'target':>8}  result"]
    for t in result["targets"].values():
        lines.append(f"{t['name']:<46} {t['value']:9.3f} {'>= ' + format(t['target'], '.2f'):>8}  {'PASS' if t['pass'] else 'MISS'}")
    return "\n".join(lines)
