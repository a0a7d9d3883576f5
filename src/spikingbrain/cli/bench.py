"""``spikingbrain bench kernels|train|ttft|decode|efficiency``: benchmarks that print ratios measured side by side and write JSON and PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_pair_arguments, candidates_from_args, length_list, print_benchmark, print_report

__all__ = ["register"]


def register(subparsers) -> None:
    """Add the ``spikingbrain bench`` group."""
    bench = subparsers.add_parser("bench", help="benchmarks (print ratios measured side by side, write JSON and PNG)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    _register_kernels(bench_sub)
    _register_train(bench_sub)
    _register_ttft(bench_sub)
    _register_decode(bench_sub)
    _register_efficiency(bench_sub)


def _register_kernels(subparsers) -> None:
    p = subparsers.add_parser(
        "kernels",
        help="GLA kernels vs naive, and long-context prefill tokens/s and GFLOP/s against the matmul peak",
        description="``spikingbrain bench kernels``: GLA kernels side by side and long-context prefill against the matmul peak.",
    )
    p.add_argument("--lengths", type=length_list, default=None, help="prefill lengths (default 1k,4k,16k,64k; --quick: 1k,4k)")
    p.add_argument("--ref-length", type=int, default=4096, help="length the longest one's tokens/s is compared with")
    p.add_argument("--quick", action="store_true", help="short run: prefill 1k,4k, GLA kernels at 512,2048, fewer repeats")
    p.add_argument("--window", type=int, default=2048, help="sliding window W (flash-attn semantics, W + 1 keys)")
    p.add_argument("--chunk", type=int, default=None, help="streaming prefill step in tokens (default: the config's)")
    p.add_argument("--gla-chunk", type=int, default=64, help="GLA chunk size (config.gla_chunk_size)")
    p.add_argument("--gla-lengths", type=length_list, default=None, help="lengths of the GLA kernel comparison")
    p.add_argument("--naive-max-length", type=int, default=2048, help="run naive/recurrent GLA only up to this length")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="stop repeating a measurement after this many seconds")
    p.add_argument("--peak-size", type=length_list, default=[4096, 2048, 2048], help="GEMM M,K,N of the matmul peak")
    p.add_argument("--hidden", type=int, default=576, help="model hidden size")
    p.add_argument("--layers", type=int, default=30, help="model layers (GLA on even, SWA on odd)")
    p.add_argument("--heads", type=int, default=9, help="query heads")
    p.add_argument("--kv-heads", type=int, default=3, help="key/value heads")
    p.add_argument("--ffn", type=int, default=1536, help="MLP intermediate size")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-kernels", help="folder for kernels.json and kernels.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.set_defaults(func=_cmd_kernels)


def _cmd_kernels(args: argparse.Namespace) -> int:
    from ..bench.kernels import format_report, run

    result = run(
        _kernels_config(args), args.out, lengths=args.lengths, gla_lengths=args.gla_lengths, ref_length=args.ref_length,
        quick=args.quick, naive_max_length=args.naive_max_length, threads=args.threads, repeats=args.repeats,
        max_seconds=args.max_seconds, peak_size=args.peak_size, seed=args.seed, plot_png=not args.no_plot,
    )
    print_report(format_report(result), result)
    return 0


def _kernels_config(args: argparse.Namespace):
    """The random model of ``bench kernels``: its shape options as a SpikingBrainConfig."""
    from ..model.config import SpikingBrainConfig

    extra = {} if args.chunk is None else {"streaming_chunk_size": args.chunk}
    return SpikingBrainConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        sliding_window=args.window,
        gla_chunk_size=args.gla_chunk,
        **extra,
    )


def _register_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="training tokens/s: conversion training vs a plain transformers fine-tune",
                              description="Training throughput side by side: conversion training steps against a plain fine-tune of the teacher with transformers.")
    p.add_argument("--student", default="spikingbrain-smollm2", help="converted model (folder or short name)")
    p.add_argument("--teacher", default="default", help="its teacher (folder or short name)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--trainable", choices=("lora", "all"), default="lora")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per candidate (after one warm-up round)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-train", help="folder for train.json and train.png")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from ..bench.train import plot, run_train_benchmark
    from ..runtime.records import write_json

    report = run_train_benchmark(args.student, args.teacher, args.seq_len, args.batch_size, args.trainable, args.rank,
                                 args.repeats, args.threads, args.seed)
    out = Path(args.out)
    write_json(out / "train.json", report)
    plot(report, out / "train.png")
    for name, r in report["results"].items():
        ratio = report["ratios_to_transformers_finetune"][name]
        memory = f"   peak {r['peak_rss_bytes'] / 2**30:.2f} GiB" if r["peak_rss_bytes"] else ""
        print(f"{name:34s} {r['tokens_per_second']:8.1f} tokens/s   x{ratio:.2f} of transformers' fine-tune{memory}")
    print(f"wrote {out / 'train.json'} and {out / 'train.png'}")
    return 0


def _register_ttft(subparsers) -> None:
    p = subparsers.add_parser(
        "ttft",
        help="time to first token against prompt length: ours against transformers (SDPA), with fitted extrapolation",
        description="``spikingbrain bench ttft``: time to first token against prompt length, a SpikingBrain model against a baseline Transformer.",
    )
    add_pair_arguments(p, "runs/bench-ttft", "ttft")
    p.add_argument("--lengths", type=length_list, default=None, help="prompt lengths for ours (default 512,1k,...,1024k)")
    p.add_argument("--baseline-lengths", type=length_list, default=None, help="prompt lengths for the baseline (default: ours)")
    p.add_argument("--cap", type=float, default=300.0, help="skip a length whose predicted single run exceeds this many seconds")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model and length (median reported)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop repeating a model at a length after this many seconds")
    p.add_argument("--extrapolate", type=length_list, default=[131072, 1048576, 4194304], help="lengths of the extrapolated ratio")
    p.set_defaults(func=_cmd_ttft)


def _cmd_ttft(args: argparse.Namespace) -> int:
    from ..bench.ttft import DEFAULT_LENGTHS, format_report, run

    candidates, notes = candidates_from_args(args)
    lengths = {"ours": args.lengths or list(DEFAULT_LENGTHS), "baseline": args.baseline_lengths or args.lengths or list(DEFAULT_LENGTHS)}
    result = run(
        candidates, lengths, Path(args.out), cap=args.cap, repeats=args.repeats, max_seconds=args.max_seconds,
        extrapolate=args.extrapolate, seed=args.seed, plot_png=not args.no_plot, notes=notes,
    )
    return print_benchmark(format_report(result), result)


def _register_decode(subparsers) -> None:
    p = subparsers.add_parser(
        "decode",
        help="per-token decode latency and memory per sequence against context length: ours against transformers (SDPA)",
        description="``spikingbrain bench decode``: per-token decode latency and throughput against context length, and memory per sequence.",
    )
    add_pair_arguments(p, "runs/bench-decode", "decode")
    p.add_argument("--contexts", type=length_list, default=None, help="context lengths (default 1k,4k,16k,64k,256k)")
    p.add_argument("--tokens", type=int, default=16, help="timed decode steps per model, context and repeat")
    p.add_argument("--repeats", type=int, default=3, help="blocks of --tokens steps per model and context, alternating")
    p.add_argument("--max-kv-gib", type=float, default=4.0, help="skip baseline contexts whose KV cache exceeds this")
    p.add_argument("--also", action="append", default=[], metavar="MODEL",
                   help="a further model of ours timed in the same run (repeatable; rows named also1, also2, ...)")
    p.add_argument("--llama-cpp", metavar="GGUF", default=None,
                   help="also time llama.cpp on this GGUF file ('default': the embedded teacher's Q4_1 file); needs llama-cpp-python")
    p.add_argument("--llama-cpp-context", type=int, default=None, metavar="N",
                   help="llama.cpp's n_ctx (default: the largest context up to 8k plus the decode steps); longer contexts skip it")
    p.set_defaults(func=_cmd_decode)


def _cmd_decode(args: argparse.Namespace) -> int:
    from ..bench.decode import DEFAULT_CONTEXTS, format_report, run

    candidates, notes = candidates_from_args(args, args.also)
    contexts = args.contexts or list(DEFAULT_CONTEXTS)
    if args.llama_cpp:
        from ..bench.llama_cpp import llama_cpp_candidate

        llama, note = llama_cpp_candidate(args.llama_cpp, args.llama_cpp_context, contexts, args.tokens * args.repeats + 1)
        candidates += [llama] if llama else []
        if note:
            print(note, file=sys.stderr)
            notes.append(note)
    result = run(candidates, contexts, Path(args.out), tokens=args.tokens, repeats=args.repeats,
                 max_kv_gib=args.max_kv_gib, seed=args.seed, plot_png=not args.no_plot, notes=notes)
    return print_benchmark(format_report(result), result)


def _register_efficiency(subparsers) -> None:
    p = subparsers.add_parser(
        "efficiency",
        help="prefill GFLOP/s of a model's configuration as a fraction of the measured fp32 matmul peak, per length",
        description="``spikingbrain bench efficiency``: prefill GFLOP/s of a model (FLOPs counted analytically) as a fraction of a matmul peak measured in the same run.",
    )
    p.add_argument("--model", default="spikingbrain-smollm2", help="model whose configuration is timed (folder or short name)")
    p.add_argument("--lengths", type=length_list, default=None, help="prefill lengths (default 1k,4k,16k,64k)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per length (median reported)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="stop repeating a length after this many seconds")
    p.add_argument("--peak-size", type=length_list, default=[4096, 2048, 2048], help="GEMM M,K,N of the matmul peak")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-efficiency", help="folder for efficiency.json and efficiency.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.set_defaults(func=_cmd_efficiency)


def _cmd_efficiency(args: argparse.Namespace) -> int:
    from ..bench.efficiency import format_report, run

    result = run(
        args.model, args.out, lengths=args.lengths, repeats=args.repeats, max_seconds=args.max_seconds,
        peak_size=args.peak_size, threads=args.threads, seed=args.seed, plot_png=not args.no_plot,
    )
    print_report(format_report(result), result)
    return 0
