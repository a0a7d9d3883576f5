"""Prefill tokens/s of the integer spiking path against fp32 dense of the same model, side by side in one run.

Usage: python benchmarks/int8_prefill.py [--model spikingbrain-smollm2] [--lengths 4k,16k,64k] [--teacher default] [--out DIR]

Variants, each timed on the same prompt of every length (``model(ids, use_cache=True,
logits_to_keep=1)`` under ``torch.inference_mode()``, streaming prefill as the model does it):
``fp32_dense``; ``int8_spiking_integer`` (W8ASpike: INT8 group weights, spiking k = 3, as the release spiked
queries and int8 keys and values, the integer path with fused passes and integer attention);
``int8_spiking_simulated`` (the same model, fp32 simulation); ``int8_spiking_integer_bf16`` (the integer path
with the attention kernel's weighted values in bf16, an option that needs AVX-512 BF16; not timed unless named); with ``--teacher``, that Transformer run by transformers (SDPA, fp32) too, so that
the time to first token of each variant is compared with the teacher's in the same run
(``ttft_speedup``: the teacher's seconds over the variant's). With ``--layer-shape`` also one
projection alone: fp32 linear, integer path with torch.compile'd passes and with eager passes.
Without ``--model`` the model is a random SmolLM2-135M-shaped hybrid (its activations have no
massive outliers, so carries are rarer than in a trained model). Writes int8_prefill.json (load average before and after, machine; after each length, so a stopped run keeps
what it measured) and int8_prefill.png. A busy machine makes every figure slower and the ratios noisy: compare the
load average with the core count before reading them.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
from spikingbrain.bench.common import time_call
from spikingbrain.runtime.candidates import load_baseline
from spikingbrain.runtime.lengths import format_length, parse_lengths
from spikingbrain.runtime.machine import load_average, machine_info, set_threads
from spikingbrain.runtime.records import command_line, write_json
from spikingbrain.spiking.apply import spikify, unspikify
from spikingbrain.spiking.int8 import fused_passes, quantize_model_int8, set_bf16_attention_values, set_integer_matmul
from spikingbrain.spiking.neuron import SpikingInput

VARIANTS = ("fp32_dense", "int8_spiking_integer", "int8_spiking_simulated", "int8_spiking_integer_bf16")
DEFAULT_VARIANTS = VARIANTS[:3]


def smollm2_shaped(window: int) -> SpikingBrainForCausalLM:
    """A random hybrid with SmolLM2-135M's shapes (30 layers, hidden 576, FFN 1536)."""
    config = SpikingBrainConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, sliding_window=window, rope_theta=1e5,
    )
    torch.manual_seed(0)
    return SpikingBrainForCausalLM(config).eval()


def models(model_ref: str | None, window: int, group_size: int, float_attention: bool = False) -> dict[str, SpikingBrainForCausalLM]:
    """The dense fp32 model and its W8ASpike copy (round-to-nearest INT8 weights, spiking k = 3; as released, spiked
    queries and int8 keys and values, unless ``float_attention``)."""
    if model_ref:
        from spikingbrain.model.loading import load_model

        dense = unspikify(load_model(model_ref))
        if dense.config.weight_quantization:
            raise SystemExit(f"{model_ref}: already INT8; give the dense model, the benchmark quantises it")
    else:
        dense = smollm2_shaped(window)
    w8aspike = copy.deepcopy(dense)
    spikify(w8aspike, k=3, spike_query=not float_attention, int8_kv=not float_attention)
    quantize_model_int8(w8aspike, group_size=group_size)
    return {"dense": dense, "w8aspike": w8aspike}


def time_prefill(model, length: int, repeats: int, max_seconds: float, warmup: int = 1, warmup_length: int | None = None) -> dict:
    """Median seconds of a streaming prefill of ``length`` random tokens, after ``warmup`` untimed ones (compiling) of
    ``warmup_length`` tokens (None: ``length``)."""
    vocab = model.config.vocab_size

    def prompt(n: int) -> torch.Tensor:
        return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(n))

    ids, warmup_ids = prompt(length), prompt(warmup_length or length)
    with torch.inference_mode():
        for _ in range(warmup):
            model(warmup_ids, use_cache=True, logits_to_keep=1)
        timing = time_call(lambda: model(ids, use_cache=True, logits_to_keep=1), repeats=repeats, warmup=0, max_seconds=max_seconds)
    return {"seconds": timing["median_s"], "tokens_per_s": length / timing["median_s"], "runs": timing["runs"],
            "cpu_per_wall": timing["cpu_per_wall"]}


def time_layer(shape: tuple[int, int, int], group_size: int, repeats: int) -> dict:
    """One projection ``[M, K] -> [M, N]``: fp32 linear, integer path with compiled and with eager passes (ms)."""
    from spikingbrain.spiking.int8 import Int8Linear

    M, K, N = shape
    linear = torch.nn.Linear(K, N, bias=False)
    layer = Int8Linear.from_linear(linear, group_size)
    layer.integer_matmul = True  # also for group layouts, where the default is the simulation
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(0))
    result = {"shape": list(shape)}
    with torch.inference_mode():
        result["fp32_linear_ms"] = 1e3 * time_call(lambda: linear(x), repeats=repeats, warmup=2)["median_s"]
        for name, compiled in (("integer_compiled_ms", True), ("integer_eager_ms", False)):
            fused_passes(compiled)
            result[name] = 1e3 * time_call(lambda: layer(SpikingInput(x, 3.0)), repeats=repeats, warmup=2)["median_s"]
    fused_passes(True)
    return result


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["prefill"]
    labels = [format_length(r["length"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    variants = [v for v in VARIANTS + ("teacher_sdpa",) if v in rows[0]]
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        ax.bar([j + i * width for j in range(len(rows))], [r[variant]["tokens_per_s"] for r in rows], width, label=variant)
    ax.set_xticks([j + width for j in range(len(rows))], labels)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill tokens/s")
    load = result["load_average_before"]
    ax.set_title(f"prefill, {result['machine']['torch_threads']} threads, load average {load[0] if load else '?'}")
    ax.set_ylim(top=1.35 * max(r[v]["tokens_per_s"] for r in rows for v in variants))  # room for the legend
    ax.legend(ncol=2, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a dense model reference (default: random SmolLM2-135M-shaped hybrid)")
    parser.add_argument("--lengths", default="4k,16k,64k", help="prompt lengths, e.g. 4k,16k,64k")
    parser.add_argument("--window", type=int, default=2048, help="sliding window of the random model")
    parser.add_argument("--group-size", type=int, default=128, help="INT8 weight group (0: per output channel)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop repeating a measurement after this long")
    parser.add_argument("--layer-shape", default="4096,576,1536", help="M,K,N of the single-projection measurement ('' skips it)")
    parser.add_argument("--teacher", default=None, help="also time this Transformer with transformers' SDPA (e.g. default; none: no teacher)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"which of {', '.join(VARIANTS)} to time")
    parser.add_argument("--warmup-length", default=None,
                        help="warm each variant up on a prompt this long (e.g. 4k) instead of one of the timed length")
    parser.add_argument("--float-attention", action="store_true",
                        help="attention of fp32 queries, keys and values (default: as the release, spiked queries times int8 keys "
                             "and values, which the integer path computes in integers)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/bench-int8-prefill")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants {args.variants!r}: choose from {', '.join(VARIANTS)}")
    warmup_length = parse_lengths(args.warmup_length)[0] if args.warmup_length else None
    threads = set_threads(args.threads)
    result = {"command": command_line(), "machine": {**machine_info(), "torch_threads": threads},
              "load_average_before": load_average(), "settings": vars(args)}
    if args.layer_shape:
        result["layer"] = time_layer(tuple(int(v) for v in args.layer_shape.split(",")), args.group_size, args.repeats)
        print(f"layer {result['layer']}", file=sys.stderr)
    built = models(args.model, args.window, args.group_size, args.float_attention)
    teacher = load_baseline(args.teacher) if args.teacher not in (None, "none") else None
    result["prefill"] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["files"] = {"json": str(out / "int8_prefill.json")}
    for length in parse_lengths(args.lengths):
        row = {"length": length}
        for variant in variants:
            model = built["dense" if variant == "fp32_dense" else "w8aspike"]
            if variant != "fp32_dense":
                set_integer_matmul(model, variant.startswith("int8_spiking_integer"))
                set_bf16_attention_values(model, variant == "int8_spiking_integer_bf16")
            row[variant] = time_prefill(model, length, args.repeats, args.max_seconds, warmup_length=warmup_length)
        line = ", ".join(f"{v} {row[v]['tokens_per_s']:.0f} tok/s" for v in variants)
        if {"int8_spiking_integer", "fp32_dense"} <= set(variants):
            row["integer_over_dense"] = row["int8_spiking_integer"]["tokens_per_s"] / row["fp32_dense"]["tokens_per_s"]
            line += f", integer / dense {row['integer_over_dense']:.2f}x"
        if teacher is not None:
            row["teacher_sdpa"] = time_prefill(teacher, length, args.repeats, args.max_seconds, warmup=0)  # nothing to compile
            row["ttft_speedup"] = {v: row["teacher_sdpa"]["seconds"] / row[v]["seconds"] for v in variants}
            line += ", TTFT against the teacher " + ", ".join(f"{v} {x:.2f}x" for v, x in row["ttft_speedup"].items())
        print(f"{format_length(length)}: {line}", file=sys.stderr)
        result["prefill"].append(row)
        write_json(out / "int8_prefill.json", result)  # each length as it is measured: a long run stopped keeps them
    result["load_average_after"] = load_average()
    result["files"]["png"] = str(plot(result, out / "int8_prefill.png"))
    write_json(out / "int8_prefill.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
