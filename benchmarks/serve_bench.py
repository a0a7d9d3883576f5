"""Serving benchmarks: TTFT of a second question on a cached long document, concurrent streaming clients, continuous batching.

Usage:
  python benchmarks/serve_bench.py document [--model spikingbrain-smollm2] [--tokens 32768] [--json docs/serve-document.json]
  python benchmarks/serve_bench.py concurrent [--model default] [--clients 8] [--seconds 60] [--json docs/serve-concurrent.json]
  python benchmarks/serve_bench.py batching [--model spikingbrain-smollm2] [--clients 8] [--seconds 60] [--document-tokens 32768]
      [--json docs/serve-batching.json] [--png docs/serve-batching.png]

``document`` asks two questions about the same document three ways, side by side in one run:
the ``ask`` command with ``--state-cache`` (two processes: the first reads the document and saves
its state, the second restores it), and the HTTP server's prefix cache (first question, second
question on the same server, then the second question on a fresh server that finds the states on
disk). TTFT is measured by the client: from sending the request to the first text.

``concurrent`` first serves each client's request alone (the reference text and single-client
tokens/s), then runs all clients at once for the given time, each repeating its request; every
answer is compared with its reference.

``batching`` measures continuous batching in one run: the cost of a decode step (one row alone
through the plain forward, and the server's fixed bucket of 8 rows holding 1 or 8 requests, with
and without packed weights), then ``concurrent`` on one server (asking for long stories, so that
most answers run to ``--max-tokens``), then the time to first token of
short prompts sent one after another while a long document (``--document-tokens``) is being read
by the same server. It writes JSON and a PNG.
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


CLIENT_TOPICS = ["the sea", "a mountain", "bread", "the moon", "a library", "winter", "a train", "music"]


def client_requests(clients: int, max_tokens: int, ask: str = "Write two sentences about {}.") -> list[dict]:
    """One seeded sampling request per client, ``ask`` filled with its topic."""
    return [
        dict(messages=[{"role": "user", "content": ask.format(CLIENT_TOPICS[i % len(CLIENT_TOPICS)])}],
             temperature=0.8, top_p=0.95, seed=1000 + i, max_tokens=max_tokens)
        for i in range(clients)
    ]


def _client_ready(index: int) -> int:
    """A no-op a client process runs once it has started and imported this module."""
    return index


def repeat_until(url: str, model: str, request: dict, reference: dict, end_at: float) -> list[dict]:
    """Send ``request`` again and again until the wall clock passes ``end_at``; each outcome against ``reference``."""
    outcomes = []
    while time.time() < end_at:
        try:
            got = stream_chat(url, model, **request)
            outcomes.append({"equal": got["text"] == reference["text"] and got["finish_reason"] == reference["finish_reason"],
                             "tokens": got["completion_tokens"], "ttft_s": got["ttft_s"], "error": None, "finished_at": time.time()})
        except Exception as err:  # counted, reported
            outcomes.append({"equal": False, "tokens": 0, "ttft_s": None, "error": repr(err), "finished_at": time.time()})
    return outcomes


def serve_alone_then_together(url: str, model: str, requests: list[dict], seconds: float) -> dict:
    """Each request alone (reference text, one client's tokens/s), then all at once for ``seconds``, each client repeating its request.

    Every client is a process of its own (as real clients are), so their HTTP work does not take
    the server's interpreter lock.
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(len(requests)) as pool:
        pool.map(_client_ready, range(len(requests)))  # started and imported before anything is timed
        print("each request alone", file=sys.stderr, flush=True)
        solo = [pool.apply(stream_chat, (url, model), r) for r in requests]
        solo_tokens, solo_seconds = sum(s["completion_tokens"] for s in solo), sum(s["seconds"] for s in solo)
        print(f"  {solo_tokens / solo_seconds:.1f} tokens/s; now {len(requests)} clients for {seconds} s", file=sys.stderr, flush=True)
        start = time.time()
        outcomes = pool.starmap(repeat_until, [(url, model, r, ref, start + seconds) for r, ref in zip(requests, solo)])
    flat = [o for per in outcomes for o in per]
    wall = max(o["finished_at"] for o in flat) - start
    tokens = sum(o["tokens"] for o in flat)
    print(f"  {tokens / wall:.1f} tokens/s together", file=sys.stderr, flush=True)
    return {
        "solo": {"tokens": solo_tokens, "seconds": round(solo_seconds, 2), "tokens_per_second": round(solo_tokens / solo_seconds, 2),
                 "ttft_s": [round(s["ttft_s"], 3) for s in solo]},
        "concurrent": {"responses": len(flat), "errors": sum(o["error"] is not None for o in flat),
                       "identical_to_solo": sum(o["equal"] for o in flat), "tokens": tokens, "wall_seconds": round(wall, 2),
                       "tokens_per_second": round(tokens / wall, 2), "responses_per_client": [len(p) for p in outcomes],
                       "median_ttft_s": round(sorted(o["ttft_s"] for o in flat if o["ttft_s"] is not None)[len(flat) // 2], 3) if flat else None},
        "aggregate_over_solo": round(tokens / wall / (solo_tokens / solo_seconds), 2),
    }


def bench_concurrent(args) -> dict:
    torch.set_num_threads(args.threads)
    engine = Engine(load_model(args.model), load_tokenizer(args.model), args.model, chunk_size=args.chunk_size)
    url, stop = start_server(engine, ServerSettings(max_active=args.clients))
    result = {"model": args.model, "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens, "threads": args.threads,
              "machine": machine_info(), "load_average_before": load_average()}
    result.update(serve_alone_then_together(url, args.model, client_requests(args.clients, args.max_tokens), args.seconds))
    stop()
    result["load_average_after"] = load_average()
    return result


def decode_step_costs(engine: Engine, repeats: int) -> dict:
    """Milliseconds of one decode step: one row through the plain forward, and buckets of ``decode_rows`` rows holding 1 or all requests.

    The variants are timed in turns (``repeats`` rounds, one call of each per round), so a change
    of load on a shared machine hits them alike; the ratios use the fastest call of each.
    """
    import copy

    model, rows = engine.model, engine.decode_rows
    gen = torch.Generator().manual_seed(0)
    caches = []
    for length in range(64, 64 + 32 * rows, 32):  # rows of different lengths
        cache = model.new_cache()
        engine.prefill(torch.randint(10, 40000, (length,), generator=gen).tolist(), cache)
        caches.append(cache)
    token = torch.tensor([[100]])
    one = copy.deepcopy(caches[0])

    def one_row():
        with torch.inference_mode():
            model(token, cache=one, use_cache=True, logits_to_keep=1)

    variants = {"one_row_forward": one_row}
    for packed in (False, True):
        name = "packed" if packed else "linear"
        alone = [copy.deepcopy(caches[0])] + [None] * (rows - 1)
        full = [copy.deepcopy(c) for c in caches]
        variants[f"bucket_one_request_{name}"] = lambda alone=alone, packed=packed: model.decode_rows(token.expand(rows, 1), alone, packed=packed)
        variants[f"bucket_full_{name}"] = lambda full=full, packed=packed: model.decode_rows(token.expand(rows, 1), full, packed=packed)
    times = {name: [] for name in variants}
    for round_ in range(repeats + 1):  # the first round warms up
        for name, call in variants.items():
            start = time.perf_counter()
            call()
            if round_:
                times[name].append(time.perf_counter() - start)
    fastest = {name: min(t) for name, t in times.items()}
    ms = {name: round(1e3 * t, 2) for name, t in fastest.items()}
    print(f"decode step ms (fastest of {repeats}): {ms}", file=sys.stderr, flush=True)
    return {
        "rows": rows,
        "milliseconds": ms,
        "median_milliseconds": {name: round(1e3 * sorted(t)[len(t) // 2], 2) for name, t in times.items()},
        "one_request_bucket_over_one_row": round(fastest["bucket_one_request_packed"] / fastest["one_row_forward"], 2),
        "full_bucket_tokens_per_s_over_one_row": round(rows * fastest["one_row_forward"] / fastest["bucket_full_packed"], 2),
        "packed_weights_bytes": sum(p.nbytes() for p in model.__dict__.get("_packed_linears", {}).values()),
    }


def short_answers_while_reading(url: str, model: str, document: str, shorts: list[dict], max_shorts: int) -> dict:
    """Stream a question about ``document`` and, while it is being read, short requests one after another; their TTFTs."""
    reading = {}

    def read():
        reading.update(stream_chat(url, model, [{"role": "user", "content": f"{document}\n\nWhat is this documentation about?"}], temperature=0, max_tokens=8))
        reading["done_at"] = time.perf_counter()

    start = time.perf_counter()
    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(2.0)  # let the document's reading start
    answers = []
    while reader.is_alive() and len(answers) < max_shorts:
        request = shorts[len(answers) % len(shorts)]
        sent = time.perf_counter()
        got = stream_chat(url, model, **request)
        answers.append({**got, "first_token_at": sent + got["ttft_s"], "request": len(answers) % len(shorts)})
        print(f"  short ttft {got['ttft_s']:.2f} s", file=sys.stderr, flush=True)
    reader.join()
    document_first = start + reading["ttft_s"]
    during = [a for a in answers if a["first_token_at"] < document_first]
    ttfts = sorted(a["ttft_s"] for a in during)
    return {
        "document_prompt_tokens": reading["prompt_tokens"],
        "document_ttft_s": round(reading["ttft_s"], 2),
        "shorts": [{"ttft_s": round(a["ttft_s"], 3), "during_reading": a in during, "text": a["text"], "request": a["request"]} for a in answers],
        "p50_ttft_s_during_reading": round(ttfts[len(ttfts) // 2], 3) if ttfts else None,
    }


def bench_batching(args) -> dict:
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    engine = Engine(load_model(args.model), tokenizer, args.model, chunk_size=args.chunk_size)
    result = {"model": args.model, "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens, "threads": args.threads,
              "chunk_size": args.chunk_size, "document_tokens": args.document_tokens, "machine": machine_info(), "load_average_before": load_average()}
    result["decode_step"] = decode_step_costs(engine, args.repeats)
    document = document_text(tokenizer, args.document_tokens)
    settings = ServerSettings(max_active=args.clients, max_prompt_tokens=args.document_tokens + 1024, request_timeout_s=7200)
    url, stop = start_server(engine, settings)
    # answers that run to max_tokens more often than two sentences do: the phase measures decoding, not prompts
    requests = client_requests(args.clients, args.max_tokens, "Tell me a long story about {}, with many details.")
    result.update(serve_alone_then_together(url, args.model, requests, args.seconds))
    result["load_average_middle"] = load_average()
    shorts = [dict(messages=[{"role": "user", "content": q}], temperature=0, max_tokens=8) for q in ("What is 2 plus 2?", "Name a colour.", "Say hello.")]
    solo_shorts = [stream_chat(url, args.model, **r)["text"] for r in shorts]
    print(f"short prompts while a {args.document_tokens}-token document is read", file=sys.stderr, flush=True)
    reading = short_answers_while_reading(url, args.model, document, shorts, args.max_shorts)
    reading["short_answers_equal_solo"] = all(s["text"] == solo_shorts[s["request"]] for s in reading["shorts"])
    result["while_reading"] = reading
    stop()
    result["targets"] = {
        "aggregate_over_one_client": {"measured": result["aggregate_over_solo"], "target": ">= 4"},
        "p50_short_ttft_s_while_reading": {"measured": reading["p50_ttft_s_during_reading"], "target": "<= 2"},
    }
    result["load_average_after"] = load_average()
    return result


def plot_batching(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, ttft, step) = plt.subplots(1, 3, figsize=(13, 4))
    one_row = 1e3 / result["decode_step"]["milliseconds"]["one_row_forward"]
    bars = {"one row, plain forward\n(fastest step, no server)": one_row, "1 client (server)": result["solo"]["tokens_per_second"],
            f"{result['clients']} clients (server)": result["concurrent"]["tokens_per_second"]}
    rate.bar(range(len(bars)), list(bars.values()), color=["grey", "tab:blue", "tab:green"])
    rate.set_xticks(range(len(bars)), list(bars), fontsize=8)
    rate.set_ylabel("decoded tokens/s")
    rate.set_title(f"aggregate {result['aggregate_over_solo']}x one client")
    shorts = result["while_reading"]["shorts"]
    ttft.bar(range(len(shorts)), [s["ttft_s"] for s in shorts], color=["tab:orange" if s["during_reading"] else "grey" for s in shorts])
    ttft.axhline(2.0, color="red", linestyle="--", label="target 2 s")
    ttft.set_xlabel("short prompt (orange: while the document was read)")
    ttft.set_ylabel("time to first token (s)")
    ttft.set_title(f"{result['while_reading']['document_prompt_tokens']}-token document being read")
    ttft.legend()
    ms = result["decode_step"]["milliseconds"]
    step.bar(range(len(ms)), list(ms.values()))
    step.set_xticks(range(len(ms)), [k.replace("bucket_", "").replace("_", " ") for k in ms], rotation=30, ha="right", fontsize=8)
    step.set_ylabel("ms per decode step")
    step.set_title(f"bucket of {result['decode_step']['rows']} rows")
    load = result["load_average_before"]
    fig.suptitle(f"{result['model']}, {result['threads']} thread(s), load average {load[0] if load else '?'} (shared machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    bat = sub.add_parser("batching", help="continuous batching: decode-step costs, concurrent clients, short TTFT while a document is read")
    bat.add_argument("--model", default="spikingbrain-smollm2")
    bat.add_argument("--clients", type=int, default=8)
    bat.add_argument("--seconds", type=float, default=60.0)
    bat.add_argument("--max-tokens", type=int, default=48)
    bat.add_argument("--document-tokens", type=int, default=32768)
    bat.add_argument("--max-shorts", type=int, default=9, help="short prompts sent while the document is read")
    bat.add_argument("--repeats", type=int, default=15, help="rounds of the decode-step measurements")
    bat.add_argument("--json", default="docs/serve-batching.json")
    bat.add_argument("--png", default="docs/serve-batching.png")
    for p in (doc, con, bat):
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
        p.add_argument("--chunk-size", type=int, default=256, help="prefill chunk (prefix states fall on its multiples)")
    args = parser.parse_args(argv)
    if args.model not in SHORT_NAMES and not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: not a short name {SHORT_NAMES} nor a folder")
    result = {"document": bench_document, "concurrent": bench_concurrent, "batching": bench_batching}[args.what](args)
    if args.what == "batching":
        result["files"] = {"json": args.json, "png": str(plot_batching(result, Path(args.png)))}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
