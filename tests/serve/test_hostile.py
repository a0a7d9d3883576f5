"""Hostile input against a live server (issue 16): every case is a 4xx with an OpenAI-shaped body, nothing stalls the others."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import torch

from spikingbrain.runtime.machine import resident_bytes
from spikingbrain.serve.engine import MAX_STOP_CHARS, Engine, SamplingParams, sample_token
from spikingbrain.serve.protocol import MAX_JSON_DEPTH
from spikingbrain.serve.server import ServerSettings

from .test_server import QUESTION, alone, client, raw


def assert_openai_error(payload, status, got_status, code=None, param=None):
    assert got_status == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


def post_on(conn, path, body: bytes):
    """POST on an open keep-alive connection; (status, headers, parsed body)."""
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), json.loads(response.read())


def chat_body(**fields) -> dict:
    return {"model": "tiny", "messages": QUESTION, "max_tokens": 2, **fields}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


HOSTILE_BODIES = [
    ("1000 deep at the top", nested(1000).encode(), None),
    ("1000 deep in an ignored field", f'{{"model": "tiny", "messages": [], "extra": {nested(1000)}}}'.encode(), None),
    (f"{MAX_JSON_DEPTH + 1} deep in an ignored field", f'{{"model": "tiny", "messages": [], "extra": {nested(MAX_JSON_DEPTH)}}}'.encode(), None),
    ("a 5000-digit integer", b'{"model": "tiny", "messages": [], "seed": ' + b"7" * 5000 + b"}", None),
    ("a 5000-digit integer in an ignored field", b'{"model": "tiny", "extra": ' + b"7" * 5000 + b"}", None),
    ("NaN", b'{"model": "tiny", "messages": [], "temperature": NaN}', None),
    ("a float out of range", b'{"model": "tiny", "messages": [], "temperature": 1e999}', None),
    ("invalid UTF-8", b'{"model": "tiny\xff", "messages": []}', None),
    ("a lone surrogate in a message", json.dumps(chat_body(messages=[{"role": "user", "content": "a\ud800b"}])).encode(), "messages.0.content"),
    ("a lone surrogate in a text part", json.dumps(chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}])).encode(), "messages.0.content.0.text"),
    ("a lone surrogate in a stop string", json.dumps(chat_body(stop=["ok", "\ud800"])).encode(), "stop.1"),
]


def test_hostile_bodies_get_openai_400s_on_a_kept_alive_connection(tiny_engine, live_server):
    app = live_server(tiny_engine)
    host, port = app.state.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    for name, body, param in HOSTILE_BODIES:
        status, _, payload = post_on(conn, "/v1/chat/completions", body)
        assert_openai_error(payload, 400, status, param=param)
        assert "lone surrogate" in payload["error"]["message"] if param else payload["error"]["code"] == "invalid_json", name
    status, _, payload = post_on(conn, "/v1/completions", json.dumps({"model": "tiny", "prompt": "x\ud800"}).encode())
    assert_openai_error(payload, 400, status, param="prompt", code="invalid_value")
    # exactly the depth limit is fine, and a valid pair of surrogates is one character
    depth_limit = {"extra": json.loads(nested(MAX_JSON_DEPTH - 1)), **chat_body()}
    status, _, payload = post_on(conn, "/v1/chat/completions", json.dumps(depth_limit).encode())
    assert status == 200 and payload["usage"]["completion_tokens"] == 2
    status, _, payload = post_on(conn, "/v1/completions", b'{"model": "tiny", "prompt": "smile \\ud83d\\ude00", "max_tokens": 3, "temperature": 0}')
    assert status == 200 and payload["choices"][0]["text"] == alone(tiny_engine, tiny_engine.encode_text("smile \U0001f600"), temperature=0, max_tokens=3)[0]
    conn.close()


EXTREME = [dict(temperature=1e-40), dict(temperature=5e-324), dict(top_p=1e-320), dict(repetition_penalty=1e-40), dict(repetition_penalty=1e308, temperature=0.5)]


@pytest.mark.parametrize("values", EXTREME, ids=lambda v: ",".join(f"{k}={v}" for k, v in v.items()))
def test_extreme_sampling_values_answer_like_the_engine(tiny_engine, live_server, values):
    app = live_server(tiny_engine)
    api = client(app)
    args = dict(model="tiny", prompt="The weather today", max_tokens=6, seed=4)
    extra = {k: v for k, v in values.items() if k not in ("temperature", "top_p")}
    standard = {k: v for k, v in values.items() if k in ("temperature", "top_p")}
    whole = api.completions.create(**args, **standard, extra_body=extra)
    expected = alone(tiny_engine, tiny_engine.encode_text("The weather today"), max_tokens=6, seed=4, **values)
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == expected[:2]
    host, port = app.state.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**args, **values, "stream": True}), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    events = [json.loads(line[6:]) for line in response.read().decode().splitlines() if line.startswith("data: {")]
    assert response.status == 200 and not [e for e in events if "error" in e]
    assert "".join(e["choices"][0]["text"] for e in events) == expected[0]


def test_tiny_temperatures_and_top_p_pick_the_most_likely_token():
    logits = torch.tensor([0.5, 3.0, 2.9, -1.0, 3.0 - 1e-6])
    generator = torch.Generator().manual_seed(0)
    for params in (SamplingParams(temperature=1e-40), SamplingParams(temperature=5e-324), SamplingParams(top_p=1e-320)):
        assert {sample_token(logits, params, generator) for _ in range(50)} == {1}
    # a tiny penalty multiplies the seen negative logit towards 0 and divides the seen positive one towards infinity
    seen = torch.tensor([True, False, False, True, False])
    assert sample_token(logits, SamplingParams(temperature=0, repetition_penalty=1e-40), generator, seen) == 0
    assert {sample_token(logits, SamplingParams(temperature=1e-40, repetition_penalty=5e-324), generator, seen) for _ in range(20)} == {0}


def test_stop_strings_are_limited_in_number_and_length(tiny_engine, live_server):
    app = live_server(tiny_engine)
    for stop, message in ((["a", "b", "c", "d", "e"], "at most 4 stop strings"), ("x" * 1_500_000, f"at most {MAX_STOP_CHARS} characters")):
        status, payload = raw(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "stop": stop})
        assert_openai_error(payload, 400, status, code="invalid_value", param="stop")
        assert message in payload["error"]["message"]
    free = client(app).completions.create(model="tiny", prompt="Numbers:", max_tokens=12, temperature=0).choices[0].text
    longest = free[3:8] + "q" * (MAX_STOP_CHARS - 5)  # starts in the text, never completes: held back, then released
    cut = client(app).completions.create(model="tiny", prompt="Numbers:", max_tokens=12, temperature=0, stop=[longest, "\u2603", "zz", free[3:8] + "q"])
    assert cut.choices[0].text == free and cut.choices[0].finish_reason == "length"


def test_a_long_step_does_not_hold_its_or_other_answers_past_the_timeout(tiny_engine, live_server):
    """One 32,000-token prefill chunk takes seconds; its 408, a second request's 408 and /health all come meanwhile."""
    engine = Engine(tiny_engine.model, tiny_engine.tokenizer, "tiny", chunk_size=32768)
    app = live_server(engine, ServerSettings(request_timeout_s=1.0, max_prompt_tokens=32768))
    answers = {}

    def ask(name, prompt):
        sent = time.monotonic()
        answers[name] = (*raw(app, "POST", "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 1}), time.monotonic() - sent)

    long = threading.Thread(target=ask, args=("long", [5 + i % 40000 for i in range(32000)]))
    long.start()
    time.sleep(0.3)
    ask("short", "Hello")
    long.join()
    health = raw(app, "GET", "/health")[1]
    for name in ("long", "short"):
        status, payload, seconds = answers[name]
        assert_openai_error(payload, 408, status, code="timeout")
        assert seconds < 1.0 + 3.0, (name, seconds)
    assert health["active"] == 1, "the 408s came only after the long step ended"
    deadline = time.monotonic() + 120
    while raw(app, "GET", "/health")[1]["active"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    relaxed = live_server(engine)
    assert client(relaxed).completions.create(model="tiny", prompt="Still fine", max_tokens=3, temperature=0).choices[0].text == alone(
        engine, engine.encode_text("Still fine"), temperature=0, max_tokens=3
    )[0]


def test_huge_prompts_are_refused_by_length_and_tokenized_off_the_event_loop(tiny_engine, live_server):
    app = live_server(tiny_engine, ServerSettings(max_prompt_tokens=32768))
    huge = "word " * (int(7.2 * 2**20) // 5)
    before = resident_bytes()
    for _ in range(3):
        status, payload = raw(app, "POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": huge}]})
        assert_openai_error(payload, 400, status, code="context_length_exceeded", param="messages")
        assert "characters" in payload["error"]["message"]
    assert resident_bytes() - before < 150 * 2**20, "a refused prompt was tokenized"
    # just under the length bound: tokenized in a worker thread while /health keeps answering
    big = "word " * (32768 * tiny_engine.max_token_chars // 5 - 10)
    order = []
    request = threading.Thread(target=lambda: order.append(("completion", raw(app, "POST", "/v1/completions", {"model": "tiny", "prompt": big})[0])))
    request.start()
    time.sleep(0.5)
    while request.is_alive() and len(order) < 3:
        order.append(("health", raw(app, "GET", "/health")[0]))
    request.join()
    assert order[:3] == [("health", 200)] * 3, order
    assert order[-1] == ("completion", 400)


def test_completions_limit_names_the_prompt(tiny_engine, live_server):
    app = live_server(tiny_engine, ServerSettings(max_prompt_tokens=20))
    for prompt in ("word " * 100, list(range(5, 50)), "x" * (20 * tiny_engine.max_token_chars + 1)):
        status, payload = raw(app, "POST", "/v1/completions", {"model": "tiny", "prompt": prompt})
        assert_openai_error(payload, 400, status, code="context_length_exceeded", param="prompt")


def test_a_body_that_never_arrives_gets_408_and_the_connection_closed(tiny_engine, live_server):
    app = live_server(tiny_engine, ServerSettings(body_timeout_s=1.0))
    host, port = app.state.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    sent, received = time.monotonic(), b""
    while chunk := sock.recv(4096):  # until the server closes the connection
        received += chunk
    sock.close()
    assert time.monotonic() - sent < 1.0 + 5.0
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert_openai_error(json.loads(body), 408, 408, code="body_timeout")
    assert client(app).completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_405_names_the_allowed_methods_and_null_assistant_content_is_accepted(tiny_engine, live_server):
    app = live_server(tiny_engine)
    host, port = app.state.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/v1/chat/completions")
    response = conn.getresponse()
    assert_openai_error(json.loads(response.read()), 405, response.status)
    assert response.getheader("Allow") == "POST"
    conn.close()
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "Go on"}]
    reply = client(app).chat.completions.create(model="tiny", messages=turns, max_tokens=4, temperature=0)
    as_empty = [{**m, "content": m["content"] or ""} for m in turns]
    assert reply.choices[0].message.content == alone(tiny_engine, tiny_engine.encode_chat(as_empty), temperature=0, max_tokens=4)[0]
    status, payload = raw(app, "POST", "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": None}]))
    assert_openai_error(payload, 400, status, code="invalid_value", param="messages.0.content")


def test_openapi_declares_the_request_bodies_and_the_error_shape(tiny_engine, live_server):
    from spikingbrain.serve.protocol import ChatRequest, CompletionRequest

    app = live_server(tiny_engine)
    status, spec = raw(app, "GET", "/openapi.json")
    assert status == 200
    schemas = spec["components"]["schemas"]
    for path, model in (("/v1/chat/completions", ChatRequest), ("/v1/completions", CompletionRequest)):
        operation = spec["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model.__name__}"}
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields)
        assert operation["responses"]["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        assert set(operation["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}  # "stream": true
    assert set(schemas["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    assert "Message" in schemas and "TextPart" in schemas
