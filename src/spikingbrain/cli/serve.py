"""``spikingbrain chat``, ``ask`` and ``serve``: talk to a model, ask about a document, serve the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..model.names import SHORT_NAMES

__all__ = ["register"]


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that choose how tokens are sampled."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1 = off)")
    group.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens (0 = off)")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help="divide logits of tokens already seen (1 = off)")
    group.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per answer")
    group.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable)")
    group.add_argument("--seed", type=int, default=None, help="random seed (same seed, same answer)")


def _sampling_from_args(args: argparse.Namespace):
    """The SamplingParams of parsed options, refusing values out of range."""
    from ..serve.engine import SamplingParams

    params = SamplingParams(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.max_tokens, tuple(args.stop), args.seed)
    problems = params.problems()
    if problems:
        raise ValueError("; ".join(f"--{name.replace('_', '-')}: {message}" for name, message in problems))
    return params


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help=f"model folder or short name ({', '.join(SHORT_NAMES)})")
    parser.add_argument("--chunk-size", type=int, default=256, help="tokens per prefill step (snapshots fall on its multiples)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _load_engine(args: argparse.Namespace, name: str | None = None, batched: bool = False):
    """The engine of a command: ``batched``, the server's 8-row decode steps with packed weights; else one row a step (chat, ask)."""
    import torch

    from ..model.loading import load_model, load_tokenizer
    from ..model.names import SHORT_NAMES
    from ..serve.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    name = name or (args.model if args.model in SHORT_NAMES else Path(args.model).name)
    rows = {} if batched else {"decode_rows": 1, "packed_decode": False}  # one user: no neighbours to be invariant to
    model = load_model(args.model)
    if getattr(args, "spiking", None) is not None:  # before the engine: its state keys include the spiking settings
        from ..spiking.apply import spikify

        spikify(model, k=args.spiking)
    return Engine(model, load_tokenizer(args.model), name, chunk_size=args.chunk_size, **rows)


def _stream(generation) -> None:
    for piece in generation.run():
        print(piece, end="", flush=True)
    print(flush=True)


def _decode_rate(generation, end: float) -> float | None:
    if generation.first_token_time is None or len(generation.completion_ids) < 2:
        return None
    return round((len(generation.completion_ids) - 1) / (end - generation.first_token_time), 2)


def _cmd_ask(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..serve.chat import split_document_prompt
    from ..serve.engine import prefix_digest
    from ..serve.snapshot import load_snapshot, save_snapshot, take_snapshot

    params = _sampling_from_args(args)
    document = ""
    if args.doc is not None:
        path = Path(args.doc).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--doc {path}: no such file; give the path of a text file")
        document = path.read_text(encoding="utf-8", errors="replace")
    engine = _load_engine(args)
    prefix_ids, question_ids = split_document_prompt(engine, document, args.question)
    key = prefix_digest(engine.fingerprint, prefix_ids)
    snapshot_path = None if args.state_cache is None else Path(args.state_cache).expanduser() / f"{key}.safetensors"
    start = time.perf_counter()
    state = "none"
    if snapshot_path is not None and snapshot_path.is_file():
        snapshot = load_snapshot(snapshot_path, engine.fingerprint)
        cache, state = snapshot.restore(engine.model), "restored"
    else:
        cache = engine.model.new_cache()
        with tqdm(total=len(prefix_ids), unit="tok", desc="reading", file=sys.stderr, disable=args.quiet) as bar:
            engine.prefill(prefix_ids, cache, on_chunk=lambda end: bar.update(end - bar.n))
        snapshot = take_snapshot(cache, key, engine.fingerprint)
        if snapshot_path is not None:
            save_snapshot(snapshot_path, snapshot, engine.name)
            state = "saved"
    prefill_s = time.perf_counter() - start
    generation = engine.start(prefix_ids + question_ids, params, cache)
    generation.start_time = start
    _stream(generation)
    end = time.perf_counter()
    stats = {
        "document_tokens": len(prefix_ids),
        "question_tokens": len(question_ids),
        "state": state,
        "state_file": None if snapshot_path is None else str(snapshot_path),
        "state_bytes": snapshot.nbytes,
        "state_constant_size": snapshot.constant_size,
        "document_seconds": round(prefill_s, 4),
        "ttft_seconds": None if generation.ttft is None else round(generation.ttft, 4),
        "new_tokens": len(generation.completion_ids),
        "decode_tokens_per_second": _decode_rate(generation, end),
        "finish_reason": generation.finish_reason,
    }
    print(json.dumps(stats) if args.json else " | ".join(f"{k}: {v}" for k, v in stats.items()), file=sys.stderr)
    return 0


CHAT_HELP = "commands: /reset (forget the conversation), /save FILE, /load FILE, /quit"


def _cmd_chat(args: argparse.Namespace) -> int:
    from ..serve.chat import ChatSession

    params = _sampling_from_args(args)
    engine = _load_engine(args)
    session = ChatSession(engine, params, args.system)
    if args.load:
        session.load(Path(args.load).expanduser())
    interactive = sys.stdin.isatty()
    print(f"chatting with {engine.name}; {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            session.reset()
            print("[conversation reset]", file=sys.stderr)
            continue
        if command in ("/save", "/load"):
            if not argument:
                print(f"[{command} needs a file name]", file=sys.stderr)
                continue
            try:
                if command == "/save":
                    size = session.save(Path(argument).expanduser())
                    print(f"[saved {session.cache.seen_tokens} tokens of state ({size} bytes) to {argument}]", file=sys.stderr)
                else:
                    session.load(Path(argument).expanduser())
                    print(f"[loaded {session.cache.seen_tokens} tokens of state from {argument}]", file=sys.stderr)
            except (ValueError, OSError) as err:
                print(f"[error: {err}]", file=sys.stderr)
            continue
        if command.startswith("/"):
            print(f"[unknown command {command}; {CHAT_HELP}]", file=sys.stderr)
            continue
        generation = session.turn(line)
        _stream(generation)
        session.finish(generation)
        end = time.perf_counter()
        print(
            f"[prompt {len(generation.prompt_ids)} tokens ({generation.cached_tokens} from the state) | "
            f"ttft {generation.ttft:.3f} s | {len(generation.completion_ids)} tokens | "
            f"{_decode_rate(generation, end)} tokens/s | state {session.cache.nbytes()} bytes]",
            file=sys.stderr,
        )


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serve.server import ServerSettings, create_app

    api_key = args.api_key or os.environ.get("SPIKINGBRAIN_API_KEY") or None
    settings = ServerSettings(
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout,
        body_timeout_s=args.body_timeout,
        max_active=args.max_active,
        api_key=api_key,
        cache_bytes=int(args.cache_mib * 2**20),
        cache_dir=None if args.cache_dir is None else Path(args.cache_dir).expanduser(),
    )
    engine = _load_engine(args, args.served_model_name, batched=True)
    app = create_app(engine, settings)
    print(
        f"serving {engine.name!r} on http://{args.host}:{args.port}/v1 "
        f"(api key {'required' if api_key else 'off'}, prefix cache {args.cache_mib} MiB"
        f"{', on disk in ' + str(settings.cache_dir) if settings.cache_dir else ''})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(subparsers) -> None:
    """Add ``spikingbrain chat``, ``ask`` and ``serve``."""
    chat = subparsers.add_parser("chat", help="interactive chat; the history stays in the model's state")
    _add_model_options(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--load", default=None, help="continue a conversation saved with /save")
    _add_sampling_arguments(chat)
    chat.set_defaults(func=_cmd_chat)

    ask = subparsers.add_parser("ask", help="answer a question about a document of any length, reporting TTFT")
    _add_model_options(ask)
    ask.add_argument("question", help="the question")
    ask.add_argument("--doc", default=None, help="text file to read before the question")
    ask.add_argument("--state-cache", default=None, help="folder of state snapshots: the document's state is saved there and reused")
    ask.add_argument("--json", action="store_true", help="print the report as JSON")
    ask.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_sampling_arguments(ask)
    ask.set_defaults(func=_cmd_ask)

    serve = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with a prefix state cache")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="model id clients send (default: the --model name)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set SPIKINGBRAIN_API_KEY)")
    serve.add_argument("--max-prompt-tokens", type=int, default=32768)
    serve.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    serve.add_argument("--default-max-tokens", type=int, default=256)
    serve.add_argument("--max-body-bytes", type=int, default=8 * 2**20)
    serve.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request, from its arrival to its last token")
    serve.add_argument("--body-timeout", type=float, default=30.0, help="seconds a client has to send the whole request body (then 408, connection closed)")
    serve.add_argument("--max-active", type=int, default=8, help="requests generating at once (others wait)")
    serve.add_argument("--cache-mib", type=float, default=512, help="memory budget of the prefix state cache")
    serve.add_argument("--cache-dir", default=None, help="also keep prefix states in this folder (atomic writes)")
    serve.add_argument("--spiking", type=float, default=None, metavar="K", help="spike every projection's input (threshold mean|x|/K; the report uses 3); the reader page then shows per-layer firing")
    serve.add_argument("--log-level", default="warning")
    serve.set_defaults(func=_cmd_serve)
