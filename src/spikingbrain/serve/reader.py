"""The document reader: the web page at ``/`` and its JSON / server-sent-event endpoints under ``/v1/documents``.

- ``POST /v1/documents?name=FILE&model=MODEL`` with the file's bytes as the body: text out of it
  (:func:`~spikingbrain.serve.documents.extract_text`), tokenized in a worker thread; 201 with the
  document (its ``id``) while its reading job runs in the scheduler, one aligned prefill chunk
  per turn beside the other requests.
- ``GET /v1/documents`` and ``GET /v1/documents/ID``: the documents and their progress.
- ``GET /v1/documents/ID/progress``: server-sent events with tokens read, tokens/s and time left,
  until the document is ready, failed or cancelled.
- ``DELETE /v1/documents/ID``: cancel its reading (between two chunks) and forget it.
- ``POST /v1/documents/ID/ask`` with ``{"question": ...}``: the answer as server-sent events,
  started from a copy of the kept document state, so only the question's tokens are read.

Every ``/v1`` route follows the server's ``--api-key`` rule; errors are OpenAI-shaped bodies.
"""

from __future__ import annotations

import array
import asyncio
import json
import math
import time
from pathlib import Path

import anyio
import torch
from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from ..model.info import kv_cache_bytes
from ..spiking.apply import current_spiking, observe_spikes, spiking_linears
from ..spiking.stats import SpikeStatistics
from .chat import split_document_prompt
from .documents import Document, DocumentStore, extract_text
from .engine import SamplingParams, prefix_digest
from .protocol import APIError, checked_sampling, Text, ToleratedModel, parse_request
from .snapshot import take_snapshot

__all__ = ["WEB_FOLDER", "MAX_DOCUMENT_BYTES", "MAX_DOCUMENT_TOKENS", "MAX_QUESTION_CHARS", "AskRequest", "add_reader", "FiringPass", "firing_by_layer"]

#: The page's static files, shipped inside the package.
WEB_FOLDER = Path(__file__).with_name("web")
STATIC = {"reader.js": "text/javascript", "reader.css": "text/css"}
#: Largest upload, and most tokens a document may have (a 1M-token document fits).
MAX_DOCUMENT_BYTES = 64 * 2**20
MAX_DOCUMENT_TOKENS = 2**21
MAX_QUESTION_CHARS = 8192
#: Seconds between two progress events.
PROGRESS_EVERY_S = 0.25


class AskRequest(ToleratedModel):
    """Body of ``POST /v1/documents/ID/ask`` (greedy unless ``temperature`` says otherwise)."""

    question: Text
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


def firing_by_layer(statistics: SpikeStatistics) -> list[dict]:
    """Per layer: the share of projection inputs that fired (non-zero spike count) and the mean |count|."""
    return [
        {"layer": entry["layer"], "fired": 1 - entry["overall"]["zero_fraction"], "mean_abs_count": entry["overall"]["mean_abs_count"]}
        for entry in statistics.summary()["layers"]
        if entry["layer"] is not None
    ]


class FiringPass:
    """One observed forward of a question and its answer on a copy of the document state: the firing of that answer alone.

    Submitted to the scheduler as a job's ready-made generation, so it runs on the thread that
    owns the model, in a batch of its own (one row, no padding rows in the statistics).
    """

    def __init__(self, model, snapshot, ids: list[int]):
        self.model, self.snapshot, self.ids = model, snapshot, ids
        self.done, self.firing, self.cache = False, None, None

    @property
    def prefilling(self) -> bool:
        """True until the pass has run (it takes the scheduler's prefill turn)."""
        return not self.done

    @torch.inference_mode()
    def step(self) -> str:
        """Run the observed forward and keep the per-layer firing."""
        cache = self.snapshot.restore(self.model)
        statistics = SpikeStatistics({name: module.weight.shape[0] for name, module in spiking_linears(self.model).items()})
        with observe_spikes(self.model, statistics):
            self.model(torch.tensor([self.ids]), cache=cache, use_cache=True, logits_to_keep=1)
        self.firing, self.done = firing_by_layer(statistics), True
        return ""


def sse(payload: dict) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload)}\n\n"


def add_reader(app, engine, scheduler, settings, check_key, read_body, job_class) -> DocumentStore:
    """Add the page and the document endpoints to ``app``.

    ``check_key(request)`` and ``read_body(request, limit)`` are the server's key rule and body
    reader; ``job_class`` is the scheduler's job type.
    """
    store = DocumentStore()
    app.state.documents = store
    model_config = engine.model.config
    value_bytes = next(engine.model.parameters()).element_size()

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB_FOLDER / "index.html", media_type="text/html")

    @app.get("/reader/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise APIError(404, f"no file {name!r}; the page's files are {sorted(STATIC)}", code="not_found")
        return FileResponse(WEB_FOLDER / name, media_type=STATIC[name])

    def describe(document: Document) -> dict:
        state_bytes = None if document.snapshot is None else document.snapshot.nbytes
        return {
            "id": document.id,
            "object": "document",
            "name": document.name,
            "model": document.model,
            "created": document.created,
            "characters": document.characters,
            "tokens": document.tokens,
            **document.progress(),
            "state_bytes": state_bytes,
            "state_constant_size": None if document.snapshot is None else document.snapshot.constant_size,
            "transformer_kv_bytes": kv_cache_bytes(model_config, document.tokens, value_bytes),
            "questions": document.questions,
            "document_tokens_reread": document.document_tokens_reread,
            "last_answer": document.last_answer,
        }

    def check_model(model: str | None) -> None:
        if model not in (None, "", engine.name):
            raise APIError(404, f"model {model!r} does not exist; this server serves {engine.name!r} (see /v1/models)", param="model", code="model_not_found")

    def prepare(name: str, data: bytes) -> tuple[array.array, int]:
        text = extract_text(name, data)
        if engine.certainly_over(text, MAX_DOCUMENT_TOKENS):
            raise APIError(400, f"{name}: {len(text)} characters is over the limit of {MAX_DOCUMENT_TOKENS} tokens; open a shorter document", param="file", code="document_too_long")
        ids = split_document_prompt(engine, text, "")[0]
        if len(ids) > MAX_DOCUMENT_TOKENS:
            raise APIError(400, f"{name}: {len(ids)} tokens is over the limit of {MAX_DOCUMENT_TOKENS} tokens; open a shorter document", param="file", code="document_too_long")
        return array.array("i", ids), len(text)

    def keep(cache, ids: array.array):
        """The kept state of a document read into ``cache`` (in a worker thread: hashing a long document takes a while)."""
        return take_snapshot(cache, prefix_digest(engine.fingerprint, ids.tolist()), engine.fingerprint)

    async def watch(document: Document, job) -> None:
        """Follow a reading job: progress events after each chunk (or the cache's count every 0.25 s), then the kept state (or the error)."""
        generation = job.generation
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), PROGRESS_EVERY_S)
            except asyncio.TimeoutError:
                kind, value = "progress", generation.cache.seen_tokens
            if document.state == "cancelled":
                return
            if kind == "progress":
                document.tokens_read = value
                continue
            if kind == "text":
                continue
            document.read_seconds = time.monotonic() - document.started
            if kind == "error":
                document.job, document.state = None, "failed"
                document.error = (value if isinstance(value, APIError) else APIError(500, f"reading failed: {value}", "server_error")).body()["error"]
                return
            document.tokens_read = generation.cache.seen_tokens
            snapshot = await anyio.to_thread.run_sync(keep, generation.cache, document.ids)
            document.job = None  # only now: a delete while the state was being kept still finds the job
            if document.state != "cancelled":
                document.snapshot, document.state = snapshot, "ready"
            return

    @app.post("/v1/documents", status_code=201, include_in_schema=False)
    async def upload(request: Request, name: str = "document.txt", model: str | None = None):
        data = await read_body(request, MAX_DOCUMENT_BYTES)  # the key first
        check_model(model)
        ids, characters = await anyio.to_thread.run_sync(prepare, name, data)
        document = Document(name=name, model=engine.name, characters=characters, ids=ids)
        store.add(document)
        prompt = ids.tolist()  # the one list of the document's ids, freed when it is read
        job = job_class(prompt, SamplingParams(temperature=0.0, max_tokens=1), math.inf, asyncio.get_running_loop())
        job.progress = True  # a ("progress", tokens read) event after each chunk
        try:
            job.generation = await anyio.to_thread.run_sync(engine.start, prompt, job.params, engine.model.new_cache())
        except BaseException:
            store.remove(document.id)
            raise
        document.job, document.started = job, time.monotonic()
        scheduler.submit(job)
        document.watcher = asyncio.create_task(watch(document, job))
        return JSONResponse(describe(document), status_code=201)

    @app.get("/v1/documents", include_in_schema=False)
    async def list_documents(request: Request):
        check_key(request)
        return {"object": "list", "data": [describe(d) for d in store.all()]}

    @app.get("/v1/documents/{ident}", include_in_schema=False)
    async def get_document(request: Request, ident: str):
        check_key(request)
        return describe(store.get(ident))

    @app.get("/v1/documents/{ident}/progress", include_in_schema=False)
    async def progress(request: Request, ident: str):
        check_key(request)
        document = store.get(ident)

        async def events():
            while True:
                yield sse(describe(document))
                if document.state != "reading":
                    break
                await asyncio.sleep(PROGRESS_EVERY_S)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.delete("/v1/documents/{ident}", include_in_schema=False)
    async def delete(request: Request, ident: str):
        check_key(request)
        document = store.remove(ident)
        if document.state == "reading":
            document.job.cancelled = True
            document.state = "cancelled"
            document.read_seconds = time.monotonic() - document.started
        return {"id": ident, "object": "document", "deleted": True, "state": document.state, "tokens_read": document.tokens_read}

    def parse_question(raw: bytes) -> tuple[str, SamplingParams]:
        req = parse_request(AskRequest, raw)
        if not req.question.strip():
            raise APIError(400, "field 'question': give the question as a non-empty string", param="question", code="invalid_value")
        if len(req.question) > MAX_QUESTION_CHARS:
            raise APIError(400, f"field 'question': {len(req.question)} characters, over the limit of {MAX_QUESTION_CHARS}", param="question", code="invalid_value")
        check_model(req.model)
        max_tokens = min(settings.default_max_tokens, settings.max_tokens_limit) if req.max_tokens is None else req.max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"field 'max_tokens': {max_tokens} is over this server's limit of {settings.max_tokens_limit}", param="max_tokens", code="invalid_value")
        params = SamplingParams(
            temperature=0.0 if req.temperature is None else req.temperature,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            max_tokens=max_tokens,
            seed=req.seed,
        )
        return req.question, checked_sampling(params)

    @app.post("/v1/documents/{ident}/ask", include_in_schema=False)
    async def ask(request: Request, ident: str):
        raw = await read_body(request)
        document = store.get(ident)
        question, params = parse_question(raw)
        if document.state != "ready":
            raise APIError(409, f"document {document.name!r} is {document.state}, not ready; wait until it is read (GET /v1/documents/{ident}/progress) or upload it again", param="id", code="document_not_ready")
        deadline = time.monotonic() + settings.request_timeout_s

        def start():
            question_ids = split_document_prompt(engine, "", question)[1]
            return engine.start(document.ids.tolist() + question_ids, params, document.snapshot.restore(engine.model)), question_ids

        generation, question_ids = await anyio.to_thread.run_sync(start)
        question_tokens = len(question_ids)
        job = job_class(generation.prompt_ids, params, deadline, asyncio.get_running_loop())
        job.generation = generation
        reread = document.tokens - generation.cached_tokens
        document.questions += 1
        document.document_tokens_reread += max(0, reread)
        scheduler.submit(job)

        async def firing() -> list[dict] | None:
            """Per-layer firing of the question and the answer, from a pass of its own (None when the model does not spike)."""
            if current_spiking(engine.model) is None:
                return None
            measured = FiringPass(engine.model, document.snapshot, question_ids + generation.completion_ids)
            probe = job_class(measured.ids, params, deadline, asyncio.get_running_loop())
            probe.generation = measured
            scheduler.submit(probe)
            try:
                kind, value = await asyncio.wait_for(probe.events.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                probe.cancelled = True
                raise APIError(408, "the firing statistics ran past the server's time limit per request", "timeout_error", code="timeout") from None
            if kind == "error":
                raise value if isinstance(value, APIError) else APIError(500, f"firing statistics failed: {value}", "server_error")
            return measured.firing

        async def events():
            try:
                yield sse({"type": "start", "document_tokens": document.tokens, "cached_tokens": generation.cached_tokens, "document_tokens_reread": max(0, reread), "question_tokens": question_tokens})
                while True:
                    remaining = deadline - time.monotonic()
                    try:
                        kind, value = await asyncio.wait_for(job.events.get(), max(0.0, remaining))
                    except asyncio.TimeoutError:
                        kind, value = "error", APIError(408, "the answer ran past the server's time limit per request; ask for fewer tokens", "timeout_error", code="timeout")
                    if kind == "text":
                        yield sse({"type": "text", "text": value})
                        continue
                    if kind == "error":
                        yield sse((value if isinstance(value, APIError) else APIError(500, f"generation failed: {value}", "server_error")).body())
                        break
                    end = time.perf_counter()
                    try:
                        measured = await firing()
                    except APIError as err:
                        yield sse(err.body())
                        break
                    answer = {
                        "type": "done",
                        "finish_reason": generation.finish_reason,
                        "text": generation.text,
                        "ttft_seconds": generation.ttft,
                        "completion_tokens": len(generation.completion_ids),
                        "decode_tokens_per_second": (len(generation.completion_ids) - 1) / (end - generation.first_token_time) if len(generation.completion_ids) > 1 else None,
                        "document_tokens_reread": max(0, reread),
                        "state_bytes": document.snapshot.nbytes,
                        "transformer_kv_bytes": kv_cache_bytes(model_config, document.tokens, value_bytes),
                        "firing": measured,
                    }
                    document.last_answer = answer
                    yield sse(answer)
                    break
            finally:
                job.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream")

    return store
