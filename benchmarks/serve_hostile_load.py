"""Load with hostile requests mixed in: normal clients must get their solo answers, hostile ones a 4xx, nobody a 5xx or a stall.

Usage:
  python benchmarks/serve_hostile_load.py [--model default] [--clients 8] [--hostile-clients 4] [--seconds 60] [--json docs/serve-hostile-load.json]

``spikingbrain serve`` runs as its own process. Each normal client first asks its request alone
(its reference answer; the four normal requests use temperature 0.8, 1e-40, top_p 1e-320 and
repetition_penalty 1e-40), then all clients run at once for the given time: the normal ones repeat
their request and compare every answer with the reference, the hostile ones cycle through the
cases of issue 16 (deep JSON, huge numbers, lone surrogates, NaN, a 1.5 MB stop string, five stop
strings, a 7 MiB message, a prompt just under the length bound, a body that never arrives, an
over-limit body, a null user message, an unknown model). A stall is a request unanswered after
the request timeout plus 5 s. The record counts requests, statuses, stalls, mismatches and the
server's resident memory before and after; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

from spikingbrain.runtime.machine import load_average, machine_info, resident_bytes
from spikingbrain.runtime.records import write_json

QUESTIONS = ["What is two plus two?", "Name a colour.", "Say something about cats.", "Where is Paris?"]
NORMAL_PARAMS = [dict(temperature=0.8, seed=1), dict(temperature=1e-40, seed=2), dict(top_p=1e-320, seed=3), dict(repetition_penalty=1e-40, temperature=0.7, seed=4)]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def hostile_cases(model: str) -> list[tuple[str, bytes | None]]:
    """(name, body) of each hostile request; a body of None is the one that never arrives."""
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    return [
        ("deep JSON", nested(1000).encode()),
        ("deep JSON in an ignored field", json.dumps(chat)[:-1].encode() + b', "x": ' + nested(1000).encode() + b"}"),
        ("5000-digit integer", json.dumps(chat)[:-1].encode() + b', "seed": ' + b"7" * 5000 + b"}"),
        ("lone surrogate", json.dumps({**chat, "messages": [{"role": "user", "content": "a\ud800b"}]}).encode()),
        ("NaN", json.dumps({**chat, "temperature": float("nan")}).encode()),
        ("1.5 MB stop string", json.dumps({**chat, "stop": "x" * 1_500_000}).encode()),
        ("five stop strings", json.dumps({**chat, "stop": list("abcde")}).encode()),
        ("7 MiB message", json.dumps({**chat, "messages": [{"role": "user", "content": "word " * (int(7 * 2**20) // 5)}]}).encode()),
        ("prompt just under the length bound", json.dumps({"model": model, "prompt": "word " * 500_000, "max_tokens": 1}).encode()),
        ("body that never arrives", None),
        ("body over the limit", b"{" + b" " * (9 * 2**20) + b"}"),
        ("null user message", json.dumps({**chat, "messages": [{"role": "user", "content": None}]}).encode()),
        ("unknown model", json.dumps({**chat, "model": "gpt-9"}).encode()),
    ]


def start_server(model: str, name: str, request_timeout: float, body_timeout: float, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """``spikingbrain serve`` as its own process on a free loopback port (``extra``: more of its options), once /health answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "spikingbrain.cli", "serve", "--model", model, "--served-model-name", name, "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen([*command, "--request-timeout", str(request_timeout), "--body-timeout", str(body_timeout), *extra], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while True:
        try:
            if call(port, "GET", "/health", None, 5)[0] == 200:
                return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the server did not come up") from None
            time.sleep(0.3)


def call(port: int, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def body_never_arrives(port: int, timeout: float) -> tuple[int, bytes]:
    """Headers and 1 byte of a 100-byte body, then wait for the answer and the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def openai_error(body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}


def normal_body(model: str, i: int, max_tokens: int) -> bytes:
    messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
    return json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, **NORMAL_PARAMS[i % len(NORMAL_PARAMS)]}).encode()


def answer_text(body: bytes) -> str:
    return json.loads(body)["choices"][0]["message"]["content"]


def run(args) -> dict:
    name = "load"
    proc, port = start_server(args.model, name, args.request_timeout, args.body_timeout)
    patience = args.request_timeout + 5
    normal_clients = args.clients - args.hostile_clients
    try:
        solo = []
        for i in range(normal_clients):
            status, body = call(port, "POST", "/v1/chat/completions", normal_body(name, i, args.max_tokens), patience)
            assert status == 200, body
            solo.append(answer_text(body))
        rss_before = resident_bytes(proc.pid)
        counts = {"normal": Counter(), "hostile": Counter()}
        per_case = {case: Counter() for case, _ in hostile_cases(name)}
        slowest = {"normal": 0.0, "hostile": 0.0}
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds

        def record(kind: str, outcome: str, seconds: float, case: str | None = None) -> None:
            with lock:
                counts[kind][outcome] += 1
                slowest[kind] = max(slowest[kind], seconds)
                if case is not None:
                    per_case[case][outcome] += 1

        def normal_client(i: int) -> None:
            body = normal_body(name, i, args.max_tokens)
            while time.monotonic() < stop_at:
                start = time.monotonic()
                try:
                    status, answer = call(port, "POST", "/v1/chat/completions", body, patience)
                except OSError:
                    record("normal", "stall", time.monotonic() - start)
                    continue
                outcome = "5xx" if status >= 500 else ("equal to solo" if status == 200 and answer_text(answer) == solo[i] else f"wrong ({status})")
                record("normal", outcome, time.monotonic() - start)

        def hostile_client(i: int) -> None:
            cases = hostile_cases(name)
            for case, body in itertools.islice(itertools.cycle(cases), i, None):
                if time.monotonic() >= stop_at:
                    return
                start = time.monotonic()
                try:
                    status, answer = body_never_arrives(port, patience) if body is None else call(port, "POST", "/v1/chat/completions", body, patience)
                except OSError:
                    record("hostile", "stall", time.monotonic() - start, case)
                    continue
                outcome = "5xx" if status >= 500 else ("4xx" if 400 <= status < 500 and openai_error(answer) else f"wrong ({status})")
                record("hostile", outcome, time.monotonic() - start, case)

        threads = [threading.Thread(target=normal_client, args=(i,)) for i in range(normal_clients)]
        threads += [threading.Thread(target=hostile_client, args=(i,)) for i in range(args.hostile_clients)]
        load_before = load_average()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rss_after = resident_bytes(proc.pid)
        status, body = call(port, "POST", "/v1/chat/completions", normal_body(name, 0, args.max_tokens), patience)
        still_correct = status == 200 and answer_text(body) == solo[0]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    tried = sum(sum(c.values()) for c in counts.values())
    failures = sum(n for c in counts.values() for outcome, n in c.items() if outcome not in ("equal to solo", "4xx"))
    return {
        "benchmark": "serve_hostile_load",
        "command": " ".join(sys.argv),
        "model": args.model,
        "clients": args.clients,
        "hostile_clients": args.hostile_clients,
        "seconds": args.seconds,
        "max_tokens": args.max_tokens,
        "request_timeout_s": args.request_timeout,
        "body_timeout_s": args.body_timeout,
        "requests_tried": tried,
        "normal": dict(counts["normal"]),
        "hostile": dict(counts["hostile"]),
        "hostile_per_case": {case: dict(c) for case, c in per_case.items()},
        "slowest_seconds": {kind: round(s, 2) for kind, s in slowest.items()},
        "server_rss_mib_before": round(rss_before / 2**20, 1),
        "server_rss_mib_after": round(rss_after / 2**20, 1),
        "normal_request_correct_afterwards": still_correct,
        "failures": failures + (not still_correct),
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model folder or short name")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--hostile-clients", type=int, default=4, help="how many of the clients send only hostile requests")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per normal answer")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--body-timeout", type=float, default=2.0)
    parser.add_argument("--json", default=None, help="write the record here")
    args = parser.parse_args(argv)
    if not 0 < args.hostile_clients < args.clients:
        parser.error(f"--hostile-clients must be between 1 and --clients - 1, got {args.hostile_clients}")
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    if args.json:
        write_json(args.json, result)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
