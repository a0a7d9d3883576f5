"""Our own fuzz suite against ``spikingbrain serve`` as its own process: schemathesis from the server's spec, and hypothesis-built hostile requests.

Each run checks: no 5xx, every error OpenAI-shaped, the server's resident memory bounded over the
run, and a normal request still answered exactly as the engine answers it alone. The example
counts are bounded so that the suite takes well under a minute.
"""

from __future__ import annotations

import http.client
import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spikingbrain.runtime.machine import resident_bytes

from .test_server import alone

FUZZ = settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
#: Growth allowed over a run: the 16 MiB prefix cache, allocator arenas and the worker threads' stacks.
MEMORY_SLACK = 120 * 2**20


def assert_openai_shaped(status: int, body: bytes, where: str) -> None:
    assert status < 500, f"{where}: {status} {body[:300]!r}"
    if status >= 400:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"], where


def post(base_url: str, path: str, body: bytes) -> tuple[int, bytes]:
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def assert_normal_request_still_correct(base_url: str, tiny_engine) -> None:
    status, body = post(base_url, "/v1/completions", json.dumps({"model": "tiny", "prompt": "Still serving", "max_tokens": 6, "temperature": 0}).encode())
    assert status == 200 and json.loads(body)["choices"][0]["text"] == alone(tiny_engine, tiny_engine.encode_text("Still serving"), temperature=0, max_tokens=6)[0]


@pytest.fixture
def memory_and_sanity(served_tiny, tiny_engine):
    """Warms the server up, yields a status counter, then checks memory and a normal answer."""
    base_url, pid = served_tiny
    for _ in range(3):
        assert_normal_request_still_correct(base_url, tiny_engine)
    before = resident_bytes(pid)
    statuses = Counter()
    yield statuses
    after = resident_bytes(pid)
    print(f"\n{sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}, server RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert after - before < MEMORY_SLACK
    assert_normal_request_still_correct(base_url, tiny_engine)


def test_schemathesis_from_our_own_spec(served_tiny, memory_and_sanity):
    import schemathesis
    from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance

    base_url, _ = served_tiny
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models")}
    modes = st.sampled_from([schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])

    @FUZZ
    @given(data=st.data())
    def fuzz(data):
        operation = data.draw(st.sampled_from(operations))
        case = data.draw(operation.as_strategy(data.draw(modes)))
        if isinstance(case.body, dict) and data.draw(st.booleans()):
            case.body["model"] = "tiny"  # reach the sampling, tokenizing and generating code too
        response = case.call(base_url=base_url, timeout=60)
        memory_and_sanity[response.status_code] += 1
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance])
        assert_openai_shaped(response.status_code, response.content, f"{case.method} {case.path} {case.body!r:.300}")

    fuzz()


def test_streamed_answers_conform_to_our_own_spec(served_tiny):
    """The two findings of the fuzz run above, every time: a streamed 200 is documented, event by event."""
    import schemathesis
    from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance

    base_url, _ = served_tiny
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    bodies = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]}, "/v1/completions": {"prompt": "Hi"}}
    for path, body in bodies.items():
        case = schema[path]["POST"].Case(body={**body, "model": "tiny", "max_tokens": 3, "stream": True}, media_type="application/json")
        response = case.call(base_url=base_url, timeout=60)
        assert response.status_code == 200 and response.headers["content-type"][0].startswith("text/event-stream")
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance])


#: Text with what tokenizers and JSON encoders trip on: lone surrogates, NUL, template markers.
NASTY_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(exclude_categories=()), max_size=20),
    st.sampled_from(["a\ud800b", "\udfff", "\x00", "<|im_start|>system", "\ufffd" * 3, "\U0001f600"]),
)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | NASTY_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
PLAIN_TEXT = st.text(min_size=1, max_size=40)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": PLAIN_TEXT})
#: Valid values of every field, the numerically extreme ones included: with these alone the answer is a 200.
VALID = {
    "max_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 100) | st.sampled_from([1e-40, 5e-324, 0.0]),
    "top_p": st.floats(0, 1, exclude_min=True) | st.sampled_from([1e-320, 5e-324]),
    "top_k": st.integers(0, 60000),
    "repetition_penalty": st.floats(5e-324, 1e308) | st.sampled_from([1e-40, 5e-324, 1e308]),
    "stop": PLAIN_TEXT | st.lists(PLAIN_TEXT, max_size=4),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
CHAT = st.fixed_dictionaries({"model": st.just("tiny"), "messages": st.lists(MESSAGE, min_size=1, max_size=3).map(lambda m: [*m, {"role": "user", "content": "Hi"}])}, optional=VALID)
COMPLETION = st.fixed_dictionaries({"model": st.just("tiny"), "prompt": PLAIN_TEXT | st.lists(st.integers(0, 49151), min_size=1, max_size=30)}, optional=VALID)
#: What replaces a field of a valid body: any JSON, and values just past each limit.
HOSTILE_VALUE = JSON_VALUE | st.sampled_from([-1, 0, 9, 2**64, -(2**63) - 1, 100.5, -1e-300, 1.0000001, [""], ["a"] * 5, "x" * 300, {"content": None}, [{"role": "user", "content": None}]])
FIELD_NAMES = [*VALID, "model", "messages", "prompt", "n", "logprobs", "tools", "echo", "suffix", "best_of", "max_completion_tokens"]
RAW_BODY = st.one_of(
    st.binary(max_size=64),
    st.integers(60, 3000).map(lambda depth: ('{"model": "tiny", "messages": [], "x": ' + "[" * depth + "]" * depth + "}").encode()),
    st.integers(90, 6000).map(lambda digits: b'{"model": "tiny", "prompt": "a", "seed": ' + b"9" * digits + b"}"),
    st.sampled_from([b'{"model": "tiny", "prompt": "a", "temperature": NaN}', b'{"model": "tiny", "prompt": "a", "top_p": -Infinity}', b"[]", b"null", b'"x"']),
)


@FUZZ
@given(data=st.data())
def test_hypothesis_hostile_requests(served_tiny, memory_and_sanity, data):
    base_url, _ = served_tiny
    path = data.draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    if data.draw(st.integers(0, 4)) == 0:
        body = data.draw(RAW_BODY)
    else:
        fields = data.draw(CHAT if path == "/v1/chat/completions" else COMPLETION)
        for name in data.draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=2, unique=True)):
            fields[name] = data.draw(HOSTILE_VALUE)
        body = json.dumps(fields).encode()
    status, answer = post(base_url, path, body)
    memory_and_sanity[status] += 1
    assert_openai_shaped(status, answer, f"{path} {body[:300]!r}")
    if status == 200 and answer.startswith(b"data: "):
        events = [json.loads(line[6:]) for line in answer.decode().splitlines() if line.startswith("data: {")]
        assert not [e for e in events if "error" in e], events
    elif status == 200:
        assert json.loads(answer)["choices"][0]["finish_reason"] in ("stop", "length")
