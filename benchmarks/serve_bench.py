"""Serving benchmarks: TTFT of a second question on a cached long document, and concurrent streaming clients.

Usage:
  python benchmarks/serve_bench.py document [--model spikingbrain-smollm2] [--tokens 32768] [--json docs/serve-document.json]
  python benchmarks/serve_bench.py concurrent [--model default] [--clients 8] [--seconds 60] [--json docs/serve-concurrent.json]

``document`` asks two questions about the same document three ways, side by side in one run:
the ``ask`` command with ``--state-cache`` (two processes: the first reads the document and saves
its state, the second restores it), and the HTTP server's prefix cache (first question, second
question on the same server, then the second question on a fresh server that finds the states on
disk). TTFT is measured by the client: from sending the request to the first text.

``concurrent`` first serves each client's request alone (the reference text and single-client
tokens/s), then runs all clients at once for the given time, each repeating its request; every
answer is compared with its reference.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from spikingbrain.model.loading import load_model, load_tokenizer
from spikingbrain.model.names import SHORT_NAMES
from spikingbrain.runtime.machine import load_average, machine_info
from spikingbrain.runtime.records import write_json
from spikingbrain.serve.engine import Engine
from spikingbrain.serve.server import ServerSettings, create_app


def start_server(engine: Engine, settings: ServerSettings):
    """A uvicorn server in a thread on a free loopback port; returns (base_url, stop)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join()
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", stop


def stream_chat(base_url: str, model: str, messages: list[dict], **params) -> dict:
    """One streaming chat request: text, TTFT, total seconds, completion tokens, finish reason."""
    from openai import OpenAI

    api = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600)
    start = time.perf_counter()
    first, text, usage, reason = None, "", None, None
    for chunk in api.chat.completions.create(model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **params):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if (choice.delta.content or choice.finish_reason) and first is None:
                first = time.perf_counter() - start
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return {
        "text": text,
        "ttft_s": first,
        "seconds": time.perf_counter() - start,
        "completion_tokens": usage.completion_tokens,
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": usage.prompt_tokens_details.cached_tokens,
        "finish_reason": reason,
    }


def document_text(tokenizer, tokens: int) -> str:
    """About ``tokens`` tokens of English text from Python's own documentation (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < tokens:
        raise ValueError(f"--tokens {tokens}: the documentation has only {len(ids)} tokens")
    return tokenizer.decode(ids[:tokens])


def run_ask(model: str, doc: Path, states: Path, question: str, threads: int, chunk: int) -> dict:
    """One ``spikingbrain ask`` process; its JSON report plus the process's wall time."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "spikingbrain.cli", "ask", "--model", model, "--doc", str(doc), "--state-cache", str(states),
         "--temperature", "0", "--max-tokens", "16", "--threads", str(threads), "--chunk-size", str(chunk), "--json", "--quiet", question],
        capture_output=True, text=True, check=True,
    )
    report = json.loads(result.stderr.strip().splitlines()[-1])
    return {**report, "answer": result.stdout.strip(), "process_seconds": round(time.perf_counter() - start, 2)}


def bench_document(args) -> dict:
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    text = document_text(tokenizer, args.tokens)
    questions = ["What is this documentation about?", "Name one Python keyword described here."]
    result = {"model": args.model, "document_tokens_requested": args.tokens, "chunk_size": args.chunk_size, "threads": args.threads,
              "machine": machine_info(), "load_average_before": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "doc.txt"
        doc.write_text(text)
        print("ask: first question (reads the document, saves its state)", file=sys.stderr, flush=True)
        first = run_ask(args.model, doc, Path(tmp) / "ask-states", questions[0], args.threads, args.chunk_size)
        print(f"  ttft {first['ttft_seconds']} s", file=sys.stderr)
        second = run_ask(args.model, doc, Path(tmp) / "ask-states", questions[1], args.threads, args.chunk_size)
        print(f"  second question ttft {second['ttft_seconds']} s", file=sys.stderr)
        result["ask"] = {"first": first, "second": second, "ttft_ratio": round(first["ttft_seconds"] / second["ttft_seconds"], 1)}

        engine = Engine(load_model(args.model), tokenizer, args.model, chunk_size=args.chunk_size)
        settings = ServerSettings(max_prompt_tokens=args.tokens + 1024, request_timeout_s=7200, cache_dir=Path(tmp) / "server-states", cache_bytes=2**30)
        sample = dict(temperature=0, max_tokens=16)
        messages = [[{"role": "user", "content": f"{text}\n\n{q}"}] for q in questions]
        url, stop = start_server(engine, settings)
        print("server: first question", file=sys.stderr, flush=True)
        server_first = stream_chat(url, args.model, messages[0], **sample)
        print(f"  ttft {server_first['ttft_s']:.2f} s; second question", file=sys.stderr, flush=True)
        server_second = stream_chat(url, args.model, messages[1], **sample)
        stop()
        url, stop = start_server(engine, settings)
        print("fresh server (states on disk): second question", file=sys.stderr, flush=True)
        server_disk = stream_chat(url, args.model, messages[1], **sample)
        stop()
    result["server"] = {
        "first": server_first,
        "second_same_server": server_second,
        "second_fresh_server_from_disk": server_disk,
        "ttft_ratio_memory": round(server_first["ttft_s"] / server_second["ttft_s"], 1),
        "ttft_ratio_disk": round(server_first["ttft_s"] / server_disk["ttft_s"], 1),
        "second_answers_equal": server_second["text"] == server_disk["text"],
    }
    result["load_average_after"] = load_average()
    return result


def bench_concurrent(args) -> dict:
    torch.set_num_threads(args.threads)
    engine = Engine(load_model(args.model), load_tokenizer(args.model), args.model, chunk_size=args.chunk_size)
    url, stop = start_server(engine, ServerSettings(max_active=args.clients))
    topics = ["the sea", "a mountain", "bread", "the moon", "a library", "winter", "a train", "music"]
    requests = [
        dict(messages=[{"role": "user", "content": f"Write two sentences about {topics[i % len(topics)]}."}],
             temperature=0.8, top_p=0.95, seed=1000 + i, max_tokens=args.max_tokens)
        for i in range(args.clients)
    ]
    result = {"model": args.model, "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens, "threads": args.threads,
              "machine": machine_info(), "load_average_before": load_average()}
    print("each request alone", file=sys.stderr, flush=True)
    solo = [stream_chat(url, args.model, **r) for r in requests]
    solo_tokens, solo_seconds = sum(s["completion_tokens"] for s in solo), sum(s["seconds"] for s in solo)
    print(f"  {solo_tokens / solo_seconds:.1f} tokens/s; now {args.clients} clients for {args.seconds} s", file=sys.stderr, flush=True)
    outcomes = [[] for _ in requests]
    start = time.perf_counter()

    def client(i):
        while time.perf_counter() - start < args.seconds:
            try:
                got = stream_chat(url, args.model, **requests[i])
                outcomes[i].append({"equal": got["text"] == solo[i]["text"] and got["finish_reason"] == solo[i]["finish_reason"],
                                    "tokens": got["completion_tokens"], "ttft_s": got["ttft_s"], "error": None})
            except Exception as err:  # counted, reported
                outcomes[i].append({"equal": False, "tokens": 0, "ttft_s": None, "error": repr(err)})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    stop()
    flat = [o for per in outcomes for o in per]
    tokens = sum(o["tokens"] for o in flat)
    result.update({
        "solo": {"tokens": solo_tokens, "seconds": round(solo_seconds, 2), "tokens_per_second": round(solo_tokens / solo_seconds, 2),
                 "ttft_s": [round(s["ttft_s"], 3) for s in solo]},
        "concurrent": {"responses": len(flat), "errors": sum(o["error"] is not None for o in flat),
                       "identical_to_solo": sum(o["equal"] for o in flat), "tokens": tokens, "wall_seconds": round(wall, 2),
                       "tokens_per_second": round(tokens / wall, 2), "responses_per_client": [len(p) for p in outcomes],
                       "median_ttft_s": round(sorted(o["ttft_s"] for o in flat if o["ttft_s"] is not None)[len(flat) // 2], 3) if flat else None},
        "aggregate_over_solo": round(tokens / wall / (solo_tokens / solo_seconds), 2),
        "load_average_after": load_average(),
    })
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    doc = sub.add_parser("document", help="TTFT of a second question on a cached long document")
    doc.add_argument("--model", default="spikingbrain-smollm2", choices=None)
    doc.add_argument("--tokens", type=int, default=32768)
    doc.add_argument("--json", default="docs/serve-document.json")
    con = sub.add_parser("concurrent", help="concurrent streaming clients against solo answers")
    con.add_argument("--model", default="default")
    con.add_argument("--clients", type=int, default=8)
    con.add_argument("--seconds", type=float, default=60.0)
    con.add_argument("--max-tokens", type=int, default=48)
    con.add_argument("--json", default="docs/serve-concurrent.json")
    for p in (doc, con):
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
        p.add_argument("--chunk-size", type=int, default=256, help="prefill chunk (prefix states fall on its multiples)")
    args = parser.parse_args(argv)
    if args.model not in SHORT_NAMES and not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: not a short name {SHORT_NAMES} nor a folder")
    result = bench_document(args) if args.what == "document" else bench_concurrent(args)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
