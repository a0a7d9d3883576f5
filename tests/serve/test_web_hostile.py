"""Hostile input to the reader's endpoints: hypothesis-built files, names, ids and question bodies never get a 5xx, and every error is OpenAI-shaped."""

from __future__ import annotations

import json
import urllib.parse

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spikingbrain.serve.server import ServerSettings

from .test_fuzz import assert_openai_shaped
from .test_reader import DOCUMENT, events, read_fully, request, upload

FUZZ = settings(max_examples=120, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck), print_blob=True)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
FILES = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"%PDF-1.4\n", b"<html><script>x</script></html>", b"\xef\xbb\xbf", b"\xff\xfe\x00", "caf\u00e9".encode("latin-1")]),
)
NAMES = st.one_of(st.text(max_size=40), st.sampled_from(["a.pdf", "a.html", "a.md", "x", ".txt", "a.PDF", "../../etc/passwd"]))


def test_hostile_files_questions_and_ids(tiny_engine, live_server):
    app = live_server(tiny_engine, ServerSettings(max_tokens_limit=4, default_max_tokens=2))
    status, document = upload(app, DOCUMENT)
    assert read_fully(app, document["id"])[-1]["state"] == "ready"
    app.state.documents.max_documents = 3
    seen: dict[int, int] = {}

    @FUZZ
    @given(data=st.data())
    def fuzz(data):
        action = data.draw(st.sampled_from(["upload", "ask", "path"]))
        if action == "upload":
            query = urllib.parse.urlencode({"name": data.draw(NAMES), **({"model": data.draw(st.text(max_size=8))} if data.draw(st.booleans()) else {})}, errors="surrogatepass")
            status, _, body = request(app, "POST", f"/v1/documents?{query}", data.draw(FILES))
            assert_openai_shaped(status, body, f"upload {query}")
            if status == 201:
                assert request(app, "DELETE", f"/v1/documents/{json.loads(body)['id']}")[0] == 200
        elif action == "ask":
            fields = data.draw(st.dictionaries(st.sampled_from(["question", "model", "max_tokens", "temperature", "repetition_penalty", "seed"]), JSON_VALUES, max_size=4))
            if data.draw(st.booleans()):
                fields["question"] = data.draw(st.text(max_size=30))
            raw = data.draw(st.one_of(st.just(json.dumps(fields).encode()), st.binary(max_size=50)))
            status, headers, body = request(app, "POST", f"/v1/documents/{document['id']}/ask", raw, {"Content-Type": "application/json"})
            assert_openai_shaped(status, body, f"ask {raw[:200]!r}")
            if status == 200:
                stream = events(body)
                assert stream[0]["type"] == "start" and stream[-1]["type"] == "done" and stream[0]["document_tokens_reread"] == 0
        else:
            path = "/v1/documents/" + urllib.parse.quote(data.draw(st.text(max_size=20)), safe="/", errors="surrogatepass") + data.draw(st.sampled_from(["", "/progress", "/ask"]))
            method = data.draw(st.sampled_from(["GET", "DELETE", "POST", "PUT"]))
            status, _, body = request(app, method, path, b"{}")
            if status != 200 or method == "POST":  # a 200 GET of the real document's path streams or lists
                assert_openai_shaped(status, body, f"{method} {path}")
        seen[status] = seen.get(status, 0) + 1

    fuzz()
    print(f"\nstatuses {dict(sorted(seen.items()))}")
    assert seen.keys() >= {201, 400, 404}, seen  # files accepted and refused, unknown ids
    _, _, body = request(app, "POST", f"/v1/documents/{document['id']}/ask", json.dumps({"question": "Still answering?", "max_tokens": 2}).encode())
    assert events(body)[-1]["type"] == "done"
