"""A live uvicorn server on a loopback port, queried with the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from spikingbrain.serve.engine import SamplingParams
from spikingbrain.serve.server import ServerSettings

QUESTION = [{"role": "user", "content": "Tell me a story about a cat."}]


def client(app, key="unused") -> OpenAI:
    return OpenAI(base_url=app.state.base_url + "/v1", api_key=key, max_retries=0, timeout=60)


def alone(engine, ids, **params) -> tuple[str, str, int]:
    """The reference: the engine run directly, on a fresh cache, outside the server."""
    generation = engine.start(ids, SamplingParams(**params))
    text = "".join(generation.run())
    return text, generation.finish_reason, len(generation.completion_ids)


def raw(app, method, path, body=None, headers=None):
    host, port = app.state.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload) if payload else None


def test_chat_and_completions_with_openai_client(tiny_engine, live_server):
    app = live_server(tiny_engine)
    api = client(app)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    chat = api.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=10, temperature=0.8, seed=5)
    text, reason, count = alone(tiny_engine, tiny_engine.encode_chat(QUESTION), temperature=0.8, max_tokens=10, seed=5)
    assert chat.choices[0].message.content == text and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == reason == "length"
    prompt_tokens = len(tiny_engine.encode_chat(QUESTION))
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (prompt_tokens, count, prompt_tokens + count)

    done = api.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=7, temperature=0)
    text, reason, _ = alone(tiny_engine, tiny_engine.encode_text("The quick brown fox"), temperature=0, max_tokens=7)
    assert done.choices[0].text == text and done.choices[0].finish_reason == reason


def test_streaming_equals_non_streaming_and_reports_usage(tiny_engine, live_server):
    app = live_server(tiny_engine)
    api = client(app)
    args = dict(model="tiny", messages=QUESTION, max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    whole = api.chat.completions.create(**args)
    chunks = list(api.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed = list(api.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == api.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0).choices[0].text


def test_stop_strings_cut_the_answer(tiny_engine, live_server):
    app = live_server(tiny_engine)
    api = client(app)
    free = api.completions.create(model="tiny", prompt="Numbers:", max_tokens=16, temperature=0).choices[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop.strip() and stop in free
    cut = api.completions.create(model="tiny", prompt="Numbers:", max_tokens=16, temperature=0, stop=[stop, "\u2603"])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(api.completions.create(model="tiny", prompt="Numbers:", max_tokens=16, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_concurrent_clients_get_their_solo_answers(tiny_engine, live_server):
    app = live_server(tiny_engine, ServerSettings(max_active=8))
    requests = [
        dict(messages=[{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"}], seed=100 + i, max_tokens=8 + 2 * i, temperature=0.9)
        for i in range(6)
    ]
    expected = [alone(tiny_engine, tiny_engine.encode_chat(r["messages"]), seed=r["seed"], max_tokens=r["max_tokens"], temperature=0.9)[0] for r in requests]
    barrier = threading.Barrier(len(requests))

    def ask(r):
        api = client(app)
        barrier.wait()
        if r["seed"] % 2:
            return "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(model="tiny", stream=True, **r))
        return api.chat.completions.create(model="tiny", **r).choices[0].message.content

    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(ask, requests))
    assert answers == expected


def test_prefix_cache_hits_give_equal_outputs_and_persist(tiny_engine, live_server, tmp_path):
    document = "Alice went to the market to buy apples, pears, bread and cheese for the picnic on Sunday. " * 4
    questions = ["What did Alice buy?", "When is the picnic?"]
    settings = ServerSettings(cache_dir=tmp_path / "states")
    app = live_server(tiny_engine, settings)
    api = client(app)
    answers = []
    for q in questions:
        messages = [{"role": "user", "content": document + "\n\n" + q}]
        reply = api.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0.7, seed=3)
        assert reply.choices[0].message.content == alone(tiny_engine, tiny_engine.encode_chat(messages), temperature=0.7, max_tokens=8, seed=3)[0]
        answers.append(reply)
    assert answers[0].usage.prompt_tokens_details.cached_tokens == 0
    shared = len(tiny_engine.encode_text(tiny_engine.render_chat([{"role": "user", "content": document}])[:-40]))
    assert answers[1].usage.prompt_tokens_details.cached_tokens >= shared - 2 * tiny_engine.chunk_size > 0
    assert app.state.prefix_cache.stats()["hits"] == 1
    assert list((tmp_path / "states").glob("*.safetensors"))
    # a second server with the same folder finds the states on disk
    again = live_server(tiny_engine, ServerSettings(cache_dir=tmp_path / "states"))
    messages = [{"role": "user", "content": document + "\n\n" + questions[0]}]
    reply = client(again).chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0.7, seed=3)
    assert reply.usage.prompt_tokens_details.cached_tokens > 0
    assert reply.choices[0].message.content == answers[0].choices[0].message.content
    # states over the whole memory budget are not kept, not even on disk
    small = live_server(tiny_engine, ServerSettings(cache_bytes=1000, cache_dir=tmp_path / "small"))
    client(small).chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert small.state.prefix_cache.stats()["entries"] == 0 and not (tmp_path / "small").exists()


def test_lru_byte_budget_evicts_oldest(tiny_engine):
    from spikingbrain.serve.server import PrefixCache
    from spikingbrain.serve.snapshot import take_snapshot

    snapshots = []
    for n in (20, 21, 22):
        cache = tiny_engine.model.new_cache()
        tiny_engine.prefill(list(range(5, 5 + n)), cache)
        snapshots.append(take_snapshot(cache, f"k{n}", tiny_engine.fingerprint))
    budget = snapshots[0].nbytes + snapshots[1].nbytes + snapshots[2].nbytes - 1
    store = PrefixCache(tiny_engine.fingerprint, "tiny", budget)
    for s in snapshots[:2]:
        store.put(s)
    assert store.get("k20") is snapshots[0]  # now the most recently used
    store.put(snapshots[2])
    assert store.get("k21") is None and store.get("k20") is not None and store.get("k22") is not None
    assert store.stats()["bytes"] == snapshots[0].nbytes + snapshots[2].nbytes <= budget


BAD = [
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, "invalid_json"),
    ("unknown model", {"model": "gpt-9", "messages": QUESTION}, 404, "model_not_found"),
    ("messages wrong type", {"model": "tiny", "messages": "hello"}, 400, "invalid_type"),
    ("max_tokens wrong type", {"model": "tiny", "messages": QUESTION, "max_tokens": "10"}, 400, "invalid_type"),
    ("temperature wrong type", {"model": "tiny", "messages": QUESTION, "temperature": [1]}, 400, "invalid_type"),
    ("content missing", {"model": "tiny", "messages": [{"role": "user"}]}, 400, "missing_field"),
    ("unknown role", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_type"),
    ("negative max_tokens", {"model": "tiny", "messages": QUESTION, "max_tokens": -5}, 400, "invalid_value"),
    ("zero max_tokens", {"model": "tiny", "messages": QUESTION, "max_tokens": 0}, 400, "invalid_value"),
    ("huge max_tokens", {"model": "tiny", "messages": QUESTION, "max_tokens": 10**12}, 400, "invalid_value"),
    ("empty messages", {"model": "tiny", "messages": []}, 400, "empty_messages"),
    ("negative temperature", {"model": "tiny", "messages": QUESTION, "temperature": -1}, 400, "invalid_value"),
    ("over the prompt limit", {"model": "tiny", "messages": [{"role": "user", "content": "word " * 300}]}, 400, "context_length_exceeded"),
    ("seed too large", {"model": "tiny", "messages": QUESTION, "seed": 2**70}, 400, "invalid_value"),
    ("n above one", {"model": "tiny", "messages": QUESTION, "n": 3}, 400, "unsupported_value"),
]


def test_bad_input_gets_openai_errors_and_serving_goes_on(tiny_engine, live_server):
    app = live_server(tiny_engine, ServerSettings(max_prompt_tokens=200, max_tokens_limit=64, max_body_bytes=4096))
    for name, body, status, code in BAD:
        got, payload = raw(app, "POST", "/v1/chat/completions", body)
        assert (got, payload["error"]["code"]) == (status, code), name
        assert payload["error"]["message"] and payload["error"]["type"], name
    got, payload = raw(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "", "max_tokens": 3})
    assert (got, payload["error"]["code"]) == (400, "empty_prompt")
    got, payload = raw(app, "POST", "/v1/completions", {"model": "tiny", "prompt": [1, 2, 10**9]})
    assert (got, payload["error"]["param"]) == (400, "prompt")
    got, payload = raw(app, "POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert (got, payload["error"]["code"]) == (413, "body_too_large")
    got, payload = raw(app, "GET", "/v1/nothing")
    assert got == 404 and "error" in payload
    got, payload = raw(app, "POST", "/v1/chat/completions", {"model": "tiny", "messages": QUESTION, "max_tokens": "10"})
    assert payload["error"]["param"] == "max_tokens" and '"10"' in payload["error"]["message"]
    # the official client sees these as typed errors
    import openai

    with pytest.raises(openai.NotFoundError):
        client(app).chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        client(app).chat.completions.create(model="tiny", messages=[])
    assert client(app).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=3).choices[0].finish_reason == "length"
    assert raw(app, "GET", "/health")[1]["active"] == 0


def test_api_key_is_required_when_set(tiny_engine, live_server):
    import openai

    app = live_server(tiny_engine, ServerSettings(api_key="s3cret"))
    with pytest.raises(openai.AuthenticationError):
        client(app, "wrong").models.list()
    assert raw(app, "GET", "/v1/models")[0] == 401
    assert raw(app, "GET", "/health")[0] == 200
    assert client(app, "s3cret").chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2).usage.completion_tokens == 2


def test_disconnect_mid_stream_and_time_limit(tiny_engine, live_server):
    # an answer far longer than the server can write before it notices the client left, however loaded the machine
    app = live_server(tiny_engine, ServerSettings(max_tokens_limit=10**6))
    host, port = app.state.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 10**6, "stream": True, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    import time

    deadline = time.monotonic() + 30
    while (health := raw(app, "GET", "/health")[1])["active"] or health["waiting"]:  # a loaded server may not have admitted it yet
        assert time.monotonic() < deadline, "the abandoned request kept generating"
        time.sleep(0.05)
    assert health["cancelled"] == 1  # dropped, not run to its 10^6 tokens
    assert client(app).completions.create(model="tiny", prompt="Still here", max_tokens=4, temperature=0).choices[0].text == alone(
        tiny_engine, tiny_engine.encode_text("Still here"), temperature=0, max_tokens=4
    )[0]
    slow = live_server(tiny_engine, ServerSettings(request_timeout_s=0.2))
    got, payload = raw(slow, "POST", "/v1/completions", {"model": "tiny", "prompt": "Go on", "max_tokens": 4000, "temperature": 0})
    assert (got, payload["error"]["code"]) == (408, "timeout")


def test_failed_disk_write_keeps_the_memory_entry(tiny_engine, tmp_path):
    from spikingbrain.serve.server import PrefixCache
    from spikingbrain.serve.snapshot import take_snapshot

    cache = tiny_engine.model.new_cache()
    tiny_engine.prefill([5, 6, 7, 8], cache)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store = PrefixCache(tiny_engine.fingerprint, "tiny", 2**30, blocker / "states")
    store.put(take_snapshot(cache, "k", tiny_engine.fingerprint))
    assert store.stats()["disk_errors"] == 1 and store.get("k") is not None
