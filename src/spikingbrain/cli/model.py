"""``spikingbrain generate``, ``info`` and ``export``: use, describe and export a model."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from ..model.names import PRESET_NAMES, SHORT_NAMES
from .common import add_model_argument

__all__ = ["register_generate", "register_info", "register_export"]


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


def _cmd_export(args: argparse.Namespace) -> int:
    from ..model.shipped import export_model

    out = export_model(args.name, args.output, overwrite=args.force)
    print(f"wrote {args.name} to {out}")
    return 0


def register_generate(sub) -> None:
    """Add ``spikingbrain generate``."""
    gen = sub.add_parser("generate", help="generate text from a prompt, streaming tokens and reporting speed")
    add_model_argument(gen)
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


def register_info(sub) -> None:
    """Add ``spikingbrain info``."""
    info = sub.add_parser("info", help="layers, parameter counts (total, active) and state size against a Transformer's KV cache")
    source = info.add_mutually_exclusive_group()
    add_model_argument(source)
    source.add_argument(
        "--preset",
        choices=sorted(PRESET_NAMES),
        help="a named configuration instead of a model folder (built on the meta device: no weights allocated)",
    )
    info.add_argument("--length", type=int, default=131072, help="sequence length for the state/KV comparison")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_info)


def register_export(sub) -> None:
    """Add ``spikingbrain export``."""
    parser = sub.add_parser("export", help="write a short-named model as a plain Hugging Face folder")
    parser.add_argument("name", choices=SHORT_NAMES, help="'default' (the teacher, as a Llama folder) or a shipped conversion")
    parser.add_argument("output", help="folder to write")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.set_defaults(func=_cmd_export)
