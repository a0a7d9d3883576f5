"""The ``spikingbrain`` command: one entry point with subcommands."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

__all__ = ["main", "build_parser"]


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="model folder (SpikingBrain, official gla_swa, or Llama/Qwen2/Mistral) or 'default' (embedded SmolLM2-135M-Instruct)",
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextIteratorStreamer

    from ..model.loading import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    if args.chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": args.prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    limit = args.max_prompt_tokens
    if limit is not None and ids.shape[1] > limit:
        print(
            f"error: the prompt has {ids.shape[1]} tokens, more than --max-prompt-tokens {limit}; "
            "shorten it or raise the limit",
            file=sys.stderr,
        )
        return 2
    # Prefill all but the last prompt token; generate() then reads only that token from the cache.
    cache = model.new_cache()
    with torch.inference_mode():
        start = time.perf_counter()
        model(ids[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    gen_kwargs = dict(
        do_sample=args.sample,
        temperature=args.temperature if args.sample else None,
        top_p=args.top_p if args.sample else None,
        top_k=args.top_k if args.sample else None,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    result = {}

    def run() -> None:
        with torch.inference_mode():
            t0 = time.perf_counter()
            result["ids"] = model.generate(ids, cache=cache, streamer=streamer, **gen_kwargs)
            result["decode_s"] = time.perf_counter() - t0

    if args.seed is not None:
        torch.manual_seed(args.seed)
    worker = threading.Thread(target=run)
    worker.start()
    for piece in streamer:
        print(piece, end="", flush=True)
    worker.join()
    new_tokens = result["ids"].shape[1] - ids.shape[1]
    stats = {
        "prompt_tokens": ids.shape[1],
        "prefill_seconds": round(prefill_s, 4),
        "prefill_tokens_per_second": round((ids.shape[1] - 1) / prefill_s, 1) if prefill_s else None,
        "new_tokens": new_tokens,
        "decode_tokens_per_second": round(new_tokens / result["decode_s"], 2) if result["decode_s"] else None,
    }
    print()
    print(json.dumps(stats) if args.json else " | ".join(f"{k}: {v}" for k, v in stats.items()), file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ..model.info import model_info, preset_info

    info = preset_info(args.preset, length=args.length) if args.preset else model_info(args.model, length=args.length)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``spikingbrain`` command."""
    parser = argparse.ArgumentParser(prog="spikingbrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt, streaming tokens and reporting speed")
    _add_model_argument(gen)
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--max-prompt-tokens", type=int, default=None, help="refuse prompts longer than this")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    gen.add_argument("--json", action="store_true", help="print the speed report as JSON")
    gen.set_defaults(func=_cmd_generate)

    info = sub.add_parser("info", help="layers, parameter counts (total, active) and state size against a Transformer's KV cache")
    source = info.add_mutually_exclusive_group()
    _add_model_argument(source)
    from ..model.presets import PRESETS

    source.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a named configuration instead of a model folder (built on the meta device: no weights allocated)",
    )
    info.add_argument("--length", type=int, default=131072, help="sequence length for the state/KV comparison")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_info)

    from ..bench import demo

    demo.register(sub)

    bench = sub.add_parser("bench", help="benchmarks (print ratios measured side by side, write JSON and PNG)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from ..bench import kernels
    from ..bench import train as bench_train

    kernels.register(bench_sub)
    bench_train.register(bench_sub)
    from ..bench import decode, efficiency, ttft

    ttft.register(bench_sub)
    decode.register(bench_sub)
    efficiency.register(bench_sub)

    from ..convert import converter
    from ..model import shipped
    from . import train

    converter.register(sub)
    train.register(sub)
    shipped.register(sub)
    from ..distributed import prefill as distributed_prefill

    distributed_prefill.register(sub)

    evaluate = sub.add_parser("eval", help="evaluation: perplexity")
    eval_sub = evaluate.add_subparsers(dest="eval", required=True)
    from ..eval import perplexity

    perplexity.register(eval_sub)
    from ..eval import harness, passkey

    passkey.register(eval_sub)
    harness.register(eval_sub)

    data = sub.add_parser("data", help="training data: sample text from a teacher, split off held-out text")
    data_sub = data.add_subparsers(dest="data", required=True)
    from ..train import data as train_data

    train_data.register(data_sub)

    from ..convert import quantize
    from ..eval import spikes

    spikes.register(sub)
    quantize.register(sub)

    from ..serve import cli as serve_cli

    serve_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``spikingbrain`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
