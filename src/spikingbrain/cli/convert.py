"""``spikingbrain convert`` and ``quantize``: a Transformer into a SpikingBrain model, a model into W8ASpike."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..convert.plan import LAYOUT_HELP
from .common import add_w8aspike_options, print_result

__all__ = ["register_convert", "register_quantize"]


def _layer_indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"layer list {text!r}: give 0-indexed layer numbers separated by commas, e.g. 6,13") from None


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..convert.converter import convert_transformer
    from ..convert.selection import read_ranking

    overrides = {}
    if args.sinks:
        overrides["num_sink_tokens"] = args.sinks
    if args.keep_first_tokens:
        overrides["keep_first_tokens"] = args.keep_first_tokens
    if args.parallel_combine:
        overrides["parallel_combine"] = args.parallel_combine
    if args.gla_update != "additive":
        overrides["gla_update"] = args.gla_update
    if args.key_tied:
        overrides.update(gla_gate="key_tied", gla_feature_map="sigmoid")
    upcycle = None
    if args.experts:
        upcycle = dict(
            num_experts=args.experts,
            num_experts_per_tok=args.top_k,
            num_shared_experts=args.shared_experts,
            dense_ffn_layers=_layer_indices(args.dense_layers),
            moe_router=args.router,
            scaling=args.upcycle_scaling,
        )
    report = convert_transformer(
        args.source,
        args.output,
        layout=args.layout,
        full_layers=_layer_indices(args.full_layers),
        sliding_window=args.window,
        overwrite=args.force,
        seed=args.seed,
        upcycle=upcycle,
        linear_layers=args.linear_layers,
        auto_full_layers=args.auto_full_layers,
        ranking=read_ranking(args.ranking) if args.ranking else None,
        **overrides,
    )
    print(json.dumps(asdict(report), indent=1) if args.json else report.summary())
    return 0


def register_convert(subparsers) -> None:
    """Add ``spikingbrain convert``."""
    parser = subparsers.add_parser("convert", help="convert a Llama/Qwen2/Mistral folder (or 'default') into a SpikingBrain model")
    parser.add_argument("source", help="source folder or 'default' (the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("output", help="folder to write (must not exist or be empty, unless --force)")
    parser.add_argument("--layout", default="alternating", help=f"layer layout: {LAYOUT_HELP}")
    parser.add_argument("--full-layers", default="", help="0-indexed layers that keep full attention, e.g. 6,13")
    parser.add_argument("--window", type=int, default=None, help="sliding window W of SWA layers (default 4096)")
    parser.add_argument("--keep-first-tokens", type=int, default=0,
                        help="first tokens every sliding-window query also sees (attention sinks, e.g. 4; 0 = plain window)")
    parser.add_argument("--gla-update", choices=("additive", "delta"), default="additive",
                        help="how GLA layers write their state: add k^T v (GLA), or the gated delta rule (overwrites what a key held)")
    auto = parser.add_argument_group("measured layouts (--layout auto / auto-parallel)")
    auto.add_argument("--linear-layers", type=int, default=None, help="GLA layers of --layout auto (default: half the layers)")
    auto.add_argument("--auto-full-layers", type=int, default=0,
                      help="layers that keep full attention, chosen by the retrieval probe (76B layout: up to 3)")
    auto.add_argument("--ranking", default=None,
                      help="reuse the layer ranking of an earlier conversion_report.json instead of measuring (minutes)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new parameters' initialisation")
    group = parser.add_argument_group("SpikingBrain-76B features")
    group.add_argument("--sinks", type=int, default=0, help="learnable sink tokens per softmax attention (76B: 128)")
    group.add_argument("--key-tied", action="store_true", help="key-tied GLA: sigmoid features, decay 1 - k, no gate parameters")
    group.add_argument("--parallel-combine", choices=("sum", "mean", "learned", "residual"), default=None,
                       help="how parallel layers combine their branches (default learned; 'residual' starts as the teacher)")
    group.add_argument("--experts", type=int, default=0, help="upcycle MLPs into N routed experts (76B: 16); 0 keeps dense MLPs")
    group.add_argument("--top-k", type=int, default=1, help="experts per token (76B: 1)")
    group.add_argument("--shared-experts", type=int, default=1, help="always-on shared experts (76B: 1)")
    group.add_argument("--dense-layers", default="", help="0-indexed layers that keep a dense MLP (76B: 0,1,2,4,6,8,10)")
    group.add_argument("--router", choices=("softmax", "sigmoid"), default="softmax", help="router score function")
    group.add_argument("--upcycle-scaling", choices=("exact", "cube_root"), default="exact",
                       help="expert scaling: 'exact' keeps the dense output at a uniform router; 'cube_root' is the report's α")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.set_defaults(func=_cmd_convert)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from ..convert.quantize import quantize_to_folder
    from ..eval.perplexity import check_window
    from ..model.checkpoint import refuse_non_empty
    from ..runtime.text import read_text

    check_window(args.context)
    if not args.force:
        refuse_non_empty(args.out)
    result = quantize_to_folder(
        args.model, args.out,
        calibration_text=read_text(args.calibration_text) if args.calibration_text else None,
        eval_text=read_text(args.eval_text) if args.eval_text else None,
        group_size=args.group_size, samples=args.samples, sample_tokens=args.sample_tokens, spiking_k=args.spiking_k,
        spike_query=args.spike_query, int8_kv=args.int8_kv, int8_weights=args.int8_weights,
        context=args.context, max_tokens=args.max_tokens, activations=args.activations, lm_head=args.lm_head,
        window_kv_dtype=None if args.window_kv == "model" else args.window_kv, attention_values_dtype=args.attention_values,
    )
    print_result(result, args.json)
    return 0


def register_quantize(subparsers) -> None:
    """Add ``spikingbrain quantize``."""
    p = subparsers.add_parser("quantize", help="W8ASpike: INT8 group weights (calibrated) and/or spiking activations, saved as a model folder")
    p.add_argument("--model", default="default", help="model folder or short name")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--group-size", type=int, default=128, help="input channels per INT8 scale (W8ASpike: 128; 0: one scale per output channel)")
    p.add_argument("--calibration-text", default=None, help="UTF-8 text for clip calibration (default: plain round-to-nearest)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (W8ASpike: 128)")
    p.add_argument("--sample-tokens", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--spiking-k", type=float, default=None, help="turn spiking on with this k (saved in the config)")
    add_w8aspike_options(p)
    p.add_argument("--no-int8-weights", dest="int8_weights", action="store_false", help="keep float weights (spiking only)")
    p.add_argument("--activations", choices=["int8"], default=None,
                   help="int8: W8A8, the plain (not spiking) inputs of the INT8 projections quantized per token and "
                        "multiplied in integers on CPU (use --group-size 0 for one integer product per layer)")
    p.add_argument("--lm-head", action="store_true",
                   help="the output head too: W8A8 per output channel, untied from the (fp32) embeddings; its decode "
                        "rows go through our VNNI kernel on CPU (oneDNN's int8 linear where the CPU lacks VNNI)")
    p.add_argument("--window-kv", choices=["float16", "int8", "model"], default="auto",
                   help="sliding-window layers keep the keys and values of decode steps in fp16 (half the bytes each step "
                        "reads) or as int8 codes with a scale per position and head (about a quarter), or in the model's "
                        "dtype; the attention stays fp32. Default: int8 with --int8-kv (the exact codes it attends), else "
                        "the model's dtype")
    p.add_argument("--attention-values", choices=["float32", "bfloat16"], default="float32",
                   help="with --spike-query --int8-kv: sum the integer attention's weighted values in fp32 (the "
                        "simulation's numbers) or in bf16 (faster prefill where the CPU has AVX-512 BF16; each weight "
                        "rounded by up to 2^-9 of itself)")
    p.add_argument("--eval-text", default=None, help="report perplexity on this text before and after")
    p.add_argument("--context", type=int, default=2048, help="perplexity window")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of --eval-text")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_quantize)
