"""The server's resident memory while the reader reads a very long document (a 1M-token one by default).

Usage:
  python benchmarks/reader_memory.py [--model spikingbrain-smollm2] [--tokens 1048576] [--question Q] [--json docs/reader-memory.json]

``spikingbrain serve`` runs as its own process. The document is real prose (Python's own
``pydoc_data.topics``) repeated up to the token count; it is uploaded to ``/v1/documents`` and,
while the server reads it, the server's resident memory and the tokens read are sampled five
times a second. The record gives the samples, the growth from the first sample past 10 % of the
document to the last one still reading (and to the end, which adds the copy of the kept state and
the document's key), the reading speed, the state's bytes beside the KV cache a Transformer of
the same shape would need, and the time to first token of one question afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from serve_hostile_load import call, start_server

from spikingbrain.runtime.machine import load_average, machine_info, resident_bytes
from spikingbrain.runtime.records import write_json


def prose_of(tokenizer, tokens: int) -> str:
    """Real English prose (pydoc topics, repeated) of about ``tokens`` tokens."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    per_copy = len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
    copies, rest = divmod(tokens, per_copy)
    return text * copies + text[: int(len(text) * rest / per_copy)]


def run(args) -> dict:
    """Start the server, upload the document, sample memory while it is read, ask one question."""
    from spikingbrain.model.loading import load_tokenizer

    text = prose_of(load_tokenizer(args.model), args.tokens).encode()
    load_before = load_average()
    proc, port = start_server(args.model, "reader", 3600.0, 120.0)
    try:
        idle = resident_bytes(proc.pid)
        status, body = call(port, "POST", "/v1/documents?name=long.txt", text, 600)
        assert status == 201, body[:500]
        document = json.loads(body)
        del text
        samples = []
        while True:
            info = json.loads(call(port, "GET", f"/v1/documents/{document['id']}", None, 60)[1])
            samples.append({"state": info["state"], "tokens_read": info["tokens_read"], "rss_bytes": resident_bytes(proc.pid), "seconds": info["seconds"]})
            if info["state"] != "reading":
                break
            time.sleep(0.2)
        assert info["state"] == "ready", info
        past_tenth = next(s for s in samples if s["tokens_read"] >= info["tokens"] / 10)
        while_reading = [s["rss_bytes"] for s in samples if s["state"] == "reading" and s["tokens_read"] >= past_tenth["tokens_read"]] or [past_tenth["rss_bytes"]]
        status, body = call(port, "POST", f"/v1/documents/{document['id']}/ask", json.dumps({"question": args.question, "max_tokens": 16}).encode(), 600)
        done = [json.loads(block[6:]) for block in body.decode().split("\n\n") if block.startswith("data: ")][-1]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {
        "model": args.label or args.model,
        "tokens": info["tokens"],
        "read_seconds": info["seconds"],
        "tokens_per_second": info["tokens_per_second"],
        "rss_idle_bytes": idle,
        "rss_past_tenth_bytes": past_tenth["rss_bytes"],
        "rss_end_bytes": samples[-1]["rss_bytes"],
        "rss_peak_bytes": max(s["rss_bytes"] for s in samples),
        "growth_while_reading_bytes": max(while_reading) - past_tenth["rss_bytes"],  # past 10 %, until the last sample still reading
        "growth_past_tenth_bytes": samples[-1]["rss_bytes"] - past_tenth["rss_bytes"],  # also the state copy made at the end
        "state_bytes": info["state_bytes"],
        "transformer_kv_bytes": info["transformer_kv_bytes"],
        "question": args.question,
        "answer": done.get("text"),
        "ttft_seconds": done.get("ttft_seconds"),
        "document_tokens_reread": done.get("document_tokens_reread"),
        "samples": samples,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="spikingbrain-smollm2", help="model folder or short name for 'spikingbrain serve'")
    parser.add_argument("--tokens", type=int, default=2**20, help="document length in tokens")
    parser.add_argument("--question", default="What is this document about?")
    parser.add_argument("--label", default=None, help="the model's name in the record (default: --model)")
    parser.add_argument("--json", default=None, help="write the record here")
    args = parser.parse_args(argv)
    record = run(args)
    if args.json:
        write_json(args.json, record)
    mib = 2**20
    print(
        f"{record['tokens']} tokens read in {record['read_seconds']} s ({record['tokens_per_second']} tokens/s); server RSS idle {record['rss_idle_bytes'] / mib:.0f} MiB, "
        f"past 10 % {record['rss_past_tenth_bytes'] / mib:.0f} MiB, growth while reading {record['growth_while_reading_bytes'] / mib:+.1f} MiB, end {record['rss_end_bytes'] / mib:.0f} MiB; "
        f"state {record['state_bytes'] / mib:.2f} MiB vs a Transformer's KV cache {record['transformer_kv_bytes'] / mib:.0f} MiB; TTFT after it {record['ttft_seconds']:.3f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
