"""The document reader's endpoints on a live server: reading with progress, answers from the kept state, cancel, the API key, errors, firing."""

from __future__ import annotations

import http.client
import json
import time

import pytest
import torch

from spikingbrain.serve.chat import split_document_prompt
from spikingbrain.serve.engine import Engine, SamplingParams
from spikingbrain.serve.server import ServerSettings

from .conftest import make_tiny
from .test_server import alone, raw

DOCUMENT = (
    "Minutes of the harbour committee. The committee met in the old lighthouse. The new ferry will be named "
    "Northern Star and will start sailing on 12 June. The budget for the repairs of the pier is 48,000 euros. "
    "Tom Berg will write to the city council about the parking places. The next meeting is on 7 April."
)


def request(app, method, path, body=b"", headers=None):
    """``(status, headers, body bytes)`` of one request."""
    host, port = app.state.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), payload


def events(payload: bytes) -> list[dict]:
    """The JSON payloads of a server-sent-event body."""
    return [json.loads(block[6:]) for block in payload.decode().split("\n\n") if block.startswith("data: ")]


def upload(app, text: str | bytes, name="minutes.txt", headers=None) -> tuple[int, dict]:
    status, _, body = request(app, "POST", f"/v1/documents?name={name}", text if isinstance(text, bytes) else text.encode(), headers)
    return status, json.loads(body)


def read_fully(app, ident: str, headers=None) -> list[dict]:
    status, response_headers, body = request(app, "GET", f"/v1/documents/{ident}/progress", headers=headers)
    assert status == 200 and response_headers["content-type"].startswith("text/event-stream")
    return events(body)


def ask(app, ident: str, question: str, headers=None, **fields) -> tuple[int, list[dict]]:
    status, _, body = request(app, "POST", f"/v1/documents/{ident}/ask", json.dumps({"question": question, **fields}).encode(), {"Content-Type": "application/json", **(headers or {})})
    return status, events(body) if status == 200 else json.loads(body)


def test_questions_start_from_the_kept_state_and_answer_as_reading_everything(tiny_engine, live_server):
    app = live_server(tiny_engine)
    status, document = upload(app, DOCUMENT)
    assert status == 201 and document["state"] == "reading" and document["name"] == "minutes.txt"
    prefix = split_document_prompt(tiny_engine, DOCUMENT, "")[0]
    assert document["tokens"] == len(prefix) and document["characters"] == len(DOCUMENT)
    progress = read_fully(app, document["id"])
    assert progress[-1]["state"] == "ready" and progress[-1]["tokens_read"] == len(prefix)
    assert [p["tokens_read"] for p in progress] == sorted(p["tokens_read"] for p in progress)
    for question in ("What will the new ferry be named?", "How much is the budget for the pier?"):
        status, stream = ask(app, document["id"], question, max_tokens=8)
        assert status == 200
        start, done = stream[0], stream[-1]
        assert start == {"type": "start", "document_tokens": len(prefix), "cached_tokens": len(prefix), "document_tokens_reread": 0, "question_tokens": len(split_document_prompt(tiny_engine, "", question)[1])}
        reference = alone(tiny_engine, prefix + split_document_prompt(tiny_engine, DOCUMENT, question)[1], temperature=0, max_tokens=8)
        assert "".join(e["text"] for e in stream if e["type"] == "text") == done["text"] == reference[0]
        assert (done["finish_reason"], done["completion_tokens"]) == reference[1:]
        assert done["ttft_seconds"] > 0 and done["firing"] is None  # the tiny model is not spiking
    status, info = raw(app, "GET", f"/v1/documents/{document['id']}")
    assert status == 200 and info["questions"] == 2 and info["document_tokens_reread"] == 0 and info["tokens_read"] == len(prefix)
    assert info["last_answer"]["text"] == done["text"]
    status, listed = raw(app, "GET", "/v1/documents")
    assert [d["id"] for d in listed["data"]] == [document["id"]]


def test_state_size_against_a_transformers_kv_cache(tiny_engine, live_server):
    """All-full layers keep exactly a Transformer's KV cache; GLA + SWA layers keep the same bytes for a short and a long document."""
    full = Engine(make_tiny(("full", "full")), tiny_engine.tokenizer, "tiny-full", chunk_size=16)
    app = live_server(full)
    _, document = upload(app, DOCUMENT)
    ready = read_fully(app, document["id"])[-1]
    config = full.model.config
    assert ready["transformer_kv_bytes"] == 2 * 2 * config.num_key_value_heads * config.head_dim * ready["tokens"] * 4
    assert ready["state_bytes"] == ready["transformer_kv_bytes"] and ready["state_constant_size"] is False

    hybrid = Engine(make_tiny(("gla", "swa")), tiny_engine.tokenizer, "tiny-hybrid", chunk_size=16)
    app = live_server(hybrid)
    sizes = []
    for text in (DOCUMENT, DOCUMENT * 12):
        _, document = upload(app, text)
        ready = read_fully(app, document["id"])[-1]
        sizes.append((ready["tokens"], ready["state_bytes"], ready["transformer_kv_bytes"]))
    (short, short_state, short_kv), (long, long_state, long_kv) = sizes
    assert long > 8 * short and short_state == long_state and long_kv / short_kv == long / short


def test_reading_takes_turns_with_other_requests_and_cancel_stops_it_between_chunks(tiny_engine, live_server):
    app = live_server(tiny_engine)
    _, document = upload(app, "The harbour committee met again. " * 12000, name="long.md")
    deadline = time.monotonic() + 60
    while raw(app, "GET", f"/v1/documents/{document['id']}")[1]["tokens_read"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # a short request is answered while the document is read: prefill chunks take turns with it
    status, reply = raw(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "Meanwhile", "max_tokens": 5, "temperature": 0})
    assert status == 200 and reply["choices"][0]["text"] == alone(tiny_engine, tiny_engine.encode_text("Meanwhile"), temperature=0, max_tokens=5)[0]
    still = raw(app, "GET", f"/v1/documents/{document['id']}")[1]
    assert still["state"] == "reading" and still["tokens_read"] < document["tokens"] / 2
    status, body = ask(app, document["id"], "Who met?")
    assert status == 409 and body["error"]["code"] == "document_not_ready" and "long.md" in body["error"]["message"]
    status, deleted = raw(app, "DELETE", f"/v1/documents/{document['id']}")
    assert status == 200 and deleted["state"] == "cancelled" and 0 < deleted["tokens_read"] < document["tokens"]
    while raw(app, "GET", "/health")[1]["active"]:
        assert time.monotonic() < deadline, "the cancelled reading job is still active"
        time.sleep(0.02)
    assert raw(app, "GET", "/health")[1]["cancelled"] == 1
    assert raw(app, "GET", f"/v1/documents/{document['id']}")[0] == 404
    status, reply = raw(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "Still serving", "max_tokens": 5, "temperature": 0})
    assert status == 200 and reply["choices"][0]["text"] == alone(tiny_engine, tiny_engine.encode_text("Still serving"), temperature=0, max_tokens=5)[0]


def test_a_delete_while_the_read_state_is_being_kept_cancels_it(tiny_engine, live_server, monkeypatch):
    """The last chunk is read and the state is being copied (in a thread) when the delete comes: it answers 200
    (cancelled), the document is gone, and the server goes on answering."""
    import threading

    from spikingbrain.serve import reader

    keeping, release = threading.Event(), threading.Event()
    real_snapshot = reader.take_snapshot

    def held_snapshot(*args):
        keeping.set()
        assert release.wait(60)
        return real_snapshot(*args)

    monkeypatch.setattr(reader, "take_snapshot", held_snapshot)
    app = live_server(tiny_engine)
    _, document = upload(app, DOCUMENT)
    assert keeping.wait(120)
    status, deleted = raw(app, "DELETE", f"/v1/documents/{document['id']}")
    release.set()
    assert status == 200 and deleted["state"] == "cancelled" and deleted["tokens_read"] == document["tokens"]
    assert raw(app, "GET", f"/v1/documents/{document['id']}")[0] == 404
    status, reply = raw(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "Still serving", "max_tokens": 3, "temperature": 0})
    assert status == 200 and reply["choices"][0]["text"] == alone(tiny_engine, tiny_engine.encode_text("Still serving"), temperature=0, max_tokens=3)[0]


def test_api_key_rule_applies_to_every_document_route(tiny_engine, live_server):
    app = live_server(tiny_engine, ServerSettings(api_key="s3cret"))
    status, headers, page = request(app, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"/reader/reader.js" in page  # the page itself loads, to ask for the key
    assert request(app, "GET", "/reader/reader.js")[0] == 200
    routes = [("POST", "/v1/documents?name=a.txt"), ("GET", "/v1/documents"), ("GET", "/v1/documents/x"), ("GET", "/v1/documents/x/progress"), ("DELETE", "/v1/documents/x"), ("POST", "/v1/documents/x/ask")]
    for wrong in ({}, {"Authorization": "Bearer nope"}):
        for method, path in routes:
            status, _, body = request(app, method, path, b"hello", wrong)
            assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key", (method, path)
    key = {"Authorization": "Bearer s3cret"}
    status, document = upload(app, DOCUMENT, headers=key)
    assert status == 201 and read_fully(app, document["id"], key)[-1]["state"] == "ready"
    status, stream = ask(app, document["id"], "What is the ferry called?", key, max_tokens=3)
    assert status == 200 and stream[-1]["type"] == "done"


def test_unusable_files_and_bad_questions_get_openai_errors(tiny_engine, live_server, monkeypatch):
    from spikingbrain.serve import reader

    app = live_server(tiny_engine)
    status, body = upload(app, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", name="photo.png")
    assert status == 400 and body["error"]["code"] == "binary_document" and body["error"]["message"].startswith("photo.png: looks like a binary file")
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["param"] == "file"
    status, _, body = request(app, "POST", "/v1/documents?name=a.txt&model=gpt-4", b"text")
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    monkeypatch.setattr(reader, "MAX_DOCUMENT_BYTES", 100)
    status, body = upload(app, "x" * 101)
    assert status == 413 and body["error"]["code"] == "body_too_large" and "limit of 100 bytes" in body["error"]["message"]
    monkeypatch.undo()
    _, document = upload(app, DOCUMENT)
    read_fully(app, document["id"])
    for body, param in ((b"{", None), (json.dumps({"question": ""}).encode(), "question"), (json.dumps({"question": "q", "max_tokens": 10**6}).encode(), "max_tokens"), (json.dumps({"question": "q", "temperature": "hot"}).encode(), "temperature")):
        status, _, reply = request(app, "POST", f"/v1/documents/{document['id']}/ask", body, {"Content-Type": "application/json"})
        assert status == 400 and json.loads(reply)["error"]["param"] == param, body
    assert ask(app, "nope", "q")[1]["error"]["code"] == "document_not_found"
    app.state.documents.max_documents = 1
    status, body = upload(app, DOCUMENT)
    assert status == 429 and body["error"]["code"] == "too_many_documents"


def test_spiking_model_reports_the_firing_of_the_answer_alone(tiny_engine, live_server):
    from spikingbrain.spiking.apply import observe_spikes, spikify, spiking_linears
    from spikingbrain.spiking.stats import SpikeStatistics

    engine = Engine(spikify(make_tiny(("gla", "swa")), k=3.0), tiny_engine.tokenizer, "tiny-spiking", chunk_size=16)
    app = live_server(engine)
    _, document = upload(app, DOCUMENT)
    read_fully(app, document["id"])
    question = "What will the new ferry be named?"
    done = ask(app, document["id"], question, max_tokens=6)[1][-1]
    # The reference: the document read unobserved, then the question and the answer's tokens in one observed forward.
    prefix, question_ids = split_document_prompt(engine, DOCUMENT, question)
    generation = engine.start(prefix + question_ids, SamplingParams(temperature=0, max_tokens=6))
    "".join(generation.run())
    assert generation.text == done["text"]
    fed = question_ids + generation.completion_ids
    cache = engine.model.new_cache()
    engine.prefill(prefix, cache)
    statistics = SpikeStatistics({name: module.weight.shape[0] for name, module in spiking_linears(engine.model).items()})
    with observe_spikes(engine.model, statistics), torch.inference_mode():
        engine.model(torch.tensor([fed]), cache=cache, use_cache=True)
    expected = [1 - layer["overall"]["zero_fraction"] for layer in statistics.summary()["layers"]]
    assert [f["layer"] for f in done["firing"]] == [0, 1]
    assert [f["fired"] for f in done["firing"]] == pytest.approx(expected, abs=0.01)
    assert all(0 < f["fired"] < 1 for f in done["firing"])


def test_dense_and_spiking_states_are_kept_under_different_keys(tiny_folder):
    """The same weights spiking compute other states: the prefix-state keys (model fingerprint) must tell them apart."""
    from spikingbrain.model.loading import load_model
    from spikingbrain.serve.engine import model_fingerprint
    from spikingbrain.spiking.apply import spikify, spiking_off

    model = load_model(tiny_folder)
    dense = model_fingerprint(model)
    assert model_fingerprint(load_model(tiny_folder)) == dense  # the key is a function of the model alone
    spikify(model, k=3)
    at_3 = model_fingerprint(model)
    spikify(model, k=2)
    assert len({dense, at_3, model_fingerprint(model)}) == 3
    with spiking_off(model):
        assert model_fingerprint(model) == dense


def test_a_pdf_is_read_as_its_text(tiny_engine, live_server):
    from .test_documents import handwritten_pdf

    app = live_server(tiny_engine)
    status, document = upload(app, handwritten_pdf(["The ferry is named Northern Star.", "The budget is 48,000 euros."]), name="minutes.pdf")
    assert status == 201 and read_fully(app, document["id"])[-1]["state"] == "ready"
    text = "The ferry is named Northern Star.\n\nThe budget is 48,000 euros."
    assert document["characters"] == len(text) and document["tokens"] == len(split_document_prompt(tiny_engine, text, "")[0])
