"""OpenAI-compatible HTTP server: a step scheduler over per-request caches and a prefix state cache.

One scheduler thread owns the model. Each request gets its own cache and generation; the
scheduler runs one unit of work (a prefill chunk or one decoded token) of each active request
in turn, so concurrent requests progress together without touching each other's state, and a
request's output depends only on its own prompt and seed. Prompts are prefilled in chunks that
end at multiples of the chunk size; the cache after such a boundary is kept in a
:class:`PrefixCache` under the hash of the tokens before it, so a later prompt that shares the
prefix (the same long document, the same system prompt) starts from there.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..model.checkpoint import CheckpointError
from .engine import Engine, Generation, SamplingParams, prefix_digest
from .protocol import APIError, ChatRequest, CommonRequest, CompletionRequest, ErrorBody, Message, parse_request, request_body_schemas
from .snapshot import Snapshot, load_snapshot, save_snapshot, take_snapshot

__all__ = ["ServerSettings", "PrefixCache", "Scheduler", "APIError", "create_app", "timeout_error"]


@dataclass
class ServerSettings:
    """Limits and options of the server."""

    max_prompt_tokens: int = 32768
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    max_body_bytes: int = 8 * 2**20
    request_timeout_s: float = 600.0
    body_timeout_s: float = 30.0
    max_active: int = 8
    api_key: str | None = None
    cache_bytes: int = 512 * 2**20
    cache_dir: Path | None = None


class PrefixCache:
    """Snapshots keyed by the hash of their token prefix: an LRU in memory under a byte budget, optionally on disk."""

    def __init__(self, fingerprint: str, model_name: str, byte_budget: int, folder: Path | None = None):
        self.fingerprint, self.model_name, self.byte_budget = fingerprint, model_name, byte_budget
        self.folder = None if folder is None else Path(folder)
        self.entries: OrderedDict[str, Snapshot] = OrderedDict()
        self.nbytes = self.hits = self.misses = self.disk_errors = 0
        self.lock = threading.Lock()

    def key(self, ids: list[int]) -> str:
        """The cache key of a token prefix."""
        return prefix_digest(self.fingerprint, ids)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> Snapshot | None:
        """The snapshot stored under ``key`` (memory first, then disk), or None."""
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        if self.folder is None or not self._path(key).is_file():
            return None
        try:
            snapshot = load_snapshot(self._path(key), self.fingerprint)
        except CheckpointError:
            return None
        if snapshot.prefix_sha256 != key:
            return None
        self._remember(key, snapshot)
        return snapshot

    def lookup(self, ids: list[int], chunk_size: int) -> Snapshot | None:
        """The longest stored snapshot of a prefix of ``ids`` that ends on a chunk boundary and leaves a token to feed."""
        for end in range((len(ids) - 1) // chunk_size * chunk_size, 0, -chunk_size):
            snapshot = self.get(self.key(ids[:end]))
            if snapshot is not None:
                with self.lock:
                    self.hits += 1
                return snapshot
        with self.lock:
            self.misses += 1
        return None

    def contains(self, key: str) -> bool:
        """Whether ``key`` is stored in memory or on disk."""
        with self.lock:
            if key in self.entries:
                return True
        return self.folder is not None and self._path(key).is_file()

    def put(self, snapshot: Snapshot) -> None:
        """Store a snapshot in memory (evicting the least recently used) and, with a folder, on disk.

        A failed disk write (full disk, no permission) is counted in ``disk_errors``, not raised:
        the request that made the snapshot goes on.
        """
        self._remember(snapshot.prefix_sha256, snapshot)
        if self.folder is not None:
            try:
                save_snapshot(self._path(snapshot.prefix_sha256), snapshot, self.model_name)
            except OSError:
                with self.lock:
                    self.disk_errors += 1

    def _remember(self, key: str, snapshot: Snapshot) -> None:
        if snapshot.nbytes > self.byte_budget:
            return
        with self.lock:
            if key in self.entries:
                self.nbytes -= self.entries.pop(key).nbytes
            self.entries[key] = snapshot
            self.nbytes += snapshot.nbytes
            while self.nbytes > self.byte_budget:
                self.nbytes -= self.entries.popitem(last=False)[1].nbytes

    def stats(self) -> dict:
        """Entries, bytes, hits, misses and failed disk writes."""
        with self.lock:
            return {
                "entries": len(self.entries),
                "bytes": self.nbytes,
                "byte_budget": self.byte_budget,
                "hits": self.hits,
                "misses": self.misses,
                "disk_errors": self.disk_errors,
            }


def timeout_error() -> APIError:
    """The 408 of a request that ran past the server's time limit."""
    return APIError(408, "the request ran past the server's time limit per request; ask for fewer tokens or a shorter prompt", "timeout_error", code="timeout")


@dataclass
class Job:
    """A request waiting for or under generation, with the queue its events go to.

    A job submitted with ``generation`` already set (anything with ``step()``, ``done`` and a
    cache) is stepped as is, without a prefix-cache lookup: the document reader starts its
    questions from a kept document state that way.
    """

    prompt_ids: list[int]
    params: SamplingParams
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    generation: Generation | None = None

    def send(self, kind: str, value) -> None:
        """Hand an event to the request's coroutine (called from the scheduler thread); dropped once its loop is closed."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the server is shutting down
            self.cancelled = True


class Scheduler:
    """The thread that owns the model: admits jobs, restores prefixes, and steps active generations in turn."""

    def __init__(self, engine: Engine, prefix_cache: PrefixCache, max_active: int = 8):
        self.engine, self.prefix_cache, self.max_active = engine, prefix_cache, max_active
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        self.condition = threading.Condition()
        self.stopped = False
        self.cancelled = 0
        self.thread = threading.Thread(target=self._loop, name="spikingbrain-scheduler", daemon=True)

    def start(self) -> None:
        """Start the scheduler thread."""
        self.thread.start()

    def stop(self) -> None:
        """Stop the scheduler thread after its current step."""
        with self.condition:
            self.stopped = True
            self.condition.notify()
        self.thread.join()

    def submit(self, job: Job) -> None:
        """Queue a job."""
        with self.condition:
            self.waiting.append(job)
            self.condition.notify()

    def load(self) -> dict:
        """Active and waiting job counts, and how many jobs were dropped because their client left."""
        with self.condition:
            return {"active": len(self.active), "waiting": len(self.waiting), "cancelled": self.cancelled}

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.stopped and not self.waiting and not self.active:
                    self.condition.wait()
                if self.stopped:
                    return
                admitted = self.waiting[: self.max_active - len(self.active)]
                del self.waiting[: len(admitted)]
            for job in admitted:
                self._guard(job, self._admit)
            for job in list(self.active):
                self._guard(job, self._advance)

    def _guard(self, job: Job, action) -> None:
        try:
            action(job)
        except Exception as err:  # a failing request must not stop the others
            self._retire(job)
            job.send("error", err)

    def _retire(self, job: Job) -> None:
        with self.condition:
            if job in self.active:
                self.active.remove(job)

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            return
        if time.monotonic() > job.deadline:
            job.send("error", timeout_error())
            return
        if job.generation is None:  # a job may arrive with its own generation (the document reader's), stepped as is
            snapshot = self.prefix_cache.lookup(job.prompt_ids, self.engine.chunk_size)
            cache = None if snapshot is None else snapshot.restore(self.engine.model)
            job.generation = self.engine.start(job.prompt_ids, job.params, cache, on_boundary=self._boundary_saver(job.prompt_ids))
        with self.condition:
            self.active.append(job)

    def _boundary_saver(self, ids: list[int]):
        """Store the cache at the last two chunk boundaries of a prompt (a shared prefix then always finds one).

        States larger than the whole memory budget are not stored (neither in memory nor on disk).
        """
        size = self.engine.chunk_size
        keep_from = (len(ids) // size - 1) * size

        def save(end: int, cache) -> None:
            if end < keep_from or end > len(ids):
                return
            if cache.nbytes() > self.prefix_cache.byte_budget:  # would be evicted at once: do not copy it
                return
            key = self.prefix_cache.key(ids[:end])
            if not self.prefix_cache.contains(key):
                self.prefix_cache.put(take_snapshot(cache, key, self.engine.fingerprint))

        return save

    def _advance(self, job: Job) -> None:
        if job.cancelled:
            self._retire(job)
            self.cancelled += 1
            return
        if time.monotonic() > job.deadline:
            self._retire(job)
            job.send("error", timeout_error())
            return
        piece = job.generation.step()
        if piece:
            job.send("text", piece)
        if job.generation.done:
            self._retire(job)
            job.send("done", job.generation)


#: Requests whose body is parsed and tokenized at once, in worker threads (the rest wait their turn).
PREPARING_AT_ONCE = 2

ERROR_RESPONSES = {status: {"model": ErrorBody, "description": what} for status, what in (
    (400, "invalid request (the field is named in error.param)"),
    (401, "missing or wrong API key"),
    (404, "unknown model"),
    (408, "the body did not arrive in time, or the request ran past the time limit"),
    (413, "request body over the limit"),
)}


def _message_text(message: Message) -> str:
    if message.content is None:
        return ""
    return message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)


def create_app(engine: Engine, settings: ServerSettings | None = None):
    """The FastAPI application serving ``engine`` (its scheduler starts and stops with the app)."""
    settings = settings or ServerSettings()
    prefix_cache = PrefixCache(engine.fingerprint, engine.name, settings.cache_bytes, settings.cache_dir)
    scheduler = Scheduler(engine, prefix_cache, settings.max_active)
    preparing = anyio.CapacityLimiter(PREPARING_AT_ONCE)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="spikingbrain", lifespan=lifespan)
    app.state.scheduler, app.state.prefix_cache, app.state.settings = scheduler, prefix_cache, settings

    def error_response(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return error_response(APIError(err.status_code, str(err.detail), headers=err.headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        return error_response(APIError(400, str(err)))

    @app.exception_handler(Exception)
    async def server_error(request, err: Exception):
        return error_response(APIError(500, f"internal error: {type(err).__name__}", "server_error"))

    def openapi() -> dict:
        """The spec, with the request bodies declared from the pydantic models the server parses them with."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            request_bodies, components = request_body_schemas({"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest})
            for path, request_body in request_bodies.items():
                schema["paths"][path]["post"]["requestBody"] = request_body
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        """The raw body, refused over ``max_body_bytes`` (413) or when it does not arrive within ``body_timeout_s`` (408, connection closed)."""
        check_key(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes is over the limit of {settings.max_body_bytes} bytes", code="body_too_large")

        async def collect() -> bytes:
            parts, size = [], 0
            async for part in request.stream():
                parts.append(part)
                size += len(part)
                if size > settings.max_body_bytes:
                    raise APIError(413, f"request body is over the limit of {settings.max_body_bytes} bytes", code="body_too_large")
            return b"".join(parts)

        try:
            return await asyncio.wait_for(collect(), settings.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(
                408, f"the request body did not arrive within {settings.body_timeout_s} s; send the whole body at once", "timeout_error", code="body_timeout", headers={"Connection": "close"}
            ) from None

    async def off_the_loop(prepare, raw: bytes, deadline: float):
        """``prepare(raw)`` in a worker thread (at most PREPARING_AT_ONCE at a time), a 408 past the deadline."""
        try:
            return await asyncio.wait_for(anyio.to_thread.run_sync(prepare, raw, limiter=preparing, abandon_on_cancel=True), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise timeout_error() from None

    def sampling(req: CommonRequest, max_tokens: int | None) -> SamplingParams:
        if req.model != engine.name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {engine.name!r} (see /v1/models)", param="model", code="model_not_found")
        for name, value in (("n", req.n), ("best_of", getattr(req, "best_of", None))):
            if value not in (None, 1):
                raise APIError(400, f"field '{name}': only 1 is supported, got {value}", param=name, code="unsupported_value")
        if req.logprobs:
            raise APIError(400, "field 'logprobs': log probabilities are not supported", param="logprobs", code="unsupported_value")
        max_tokens = min(settings.default_max_tokens, settings.max_tokens_limit) if max_tokens is None else max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"field 'max_tokens': {max_tokens} is over this server's limit of {settings.max_tokens_limit}", param="max_tokens", code="invalid_value")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            max_tokens=max_tokens,
            stop=stop,
            seed=req.seed,
        )
        problems = params.problems()
        if problems:
            name, message = problems[0]
            raise APIError(400, f"field '{name}': {message}", param=name, code="invalid_value")
        return params

    def over_the_limit(count: str, param: str) -> APIError:
        return APIError(400, f"the prompt has {count}, over this server's limit of {settings.max_prompt_tokens} tokens; shorten it", param=param, code="context_length_exceeded")

    def encode(text: str, param: str) -> list[int]:
        """Token ids of a prompt, refused from its length alone when it cannot fit (no tokenizing)."""
        if engine.certainly_over(text, settings.max_prompt_tokens):
            raise over_the_limit(f"{len(text)} characters (tokens hold at most {engine.max_token_chars})", param)
        return engine.encode_text(text)

    def check_prompt(ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty; give at least one token of text", param="prompt", code="empty_prompt")
        if len(ids) > settings.max_prompt_tokens:
            raise over_the_limit(f"{len(ids)} tokens", param)

    async def next_event(job: Job, request: Request | None) -> tuple[str, object]:
        """The job's next event; a timeout error at its deadline, whatever the scheduler is doing (``request``: watch for a disconnect)."""
        while True:
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                job.cancelled = True
                return "error", timeout_error()
            try:
                return await asyncio.wait_for(job.events.get(), timeout=min(1.0, remaining))
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    return "disconnected", None

    def as_api_error(value) -> APIError:
        return value if isinstance(value, APIError) else APIError(500, f"generation failed: {value}", "server_error")

    async def run_job(request: Request, ids: list[int], params: SamplingParams, deadline: float, stream: bool, render):
        job = Job(ids, params, deadline, asyncio.get_running_loop())
        scheduler.submit(job)
        created, ident = int(time.time()), uuid.uuid4().hex[:24]
        if not stream:
            try:
                kind, value = await next_event(job, request)
                while kind == "text":
                    kind, value = await next_event(job, request)
                if kind == "disconnected":
                    return JSONResponse({}, status_code=499)
                if kind == "error":
                    raise as_api_error(value)
                return JSONResponse(render(ident, created, value, None, final=True))
            finally:
                job.cancelled = True

        async def events():
            try:
                yield sse(render(ident, created, None, "", first=True))
                while True:
                    kind, value = await next_event(job, None)
                    if kind == "text":
                        yield sse(render(ident, created, None, value))
                    elif kind == "error":
                        yield sse(as_api_error(value).body())
                        break
                    else:
                        yield sse(render(ident, created, value, None, final=True))
                        if render.include_usage:
                            yield sse(render(ident, created, value, None, usage_only=True))
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream")

    def usage(generation: Generation) -> dict:
        prompt, completion = len(generation.prompt_ids), len(generation.completion_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": generation.cached_tokens},
        }

    class Render:
        """Builds the response (or the stream's chunks) of one request."""

        def __init__(self, req: CommonRequest):
            self.streaming = bool(req.stream)
            self.include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)

    class ChatRender(Render):
        """Chat completions and their chunks."""

        def __call__(self, ident, created, generation, piece, first=False, final=False, usage_only=False):
            base = {"id": f"chatcmpl-{ident}", "created": created, "model": engine.name, "system_fingerprint": engine.fingerprint[:16]}
            if final and not self.streaming:
                choice = {"index": 0, "message": {"role": "assistant", "content": generation.text}, "finish_reason": generation.finish_reason, "logprobs": None}
                return {**base, "object": "chat.completion", "choices": [choice], "usage": usage(generation)}
            if usage_only:
                return {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(generation)}
            delta = {"role": "assistant", "content": ""} if first else ({} if final else {"content": piece})
            choice = {"index": 0, "delta": delta, "finish_reason": generation.finish_reason if final else None, "logprobs": None}
            return {**base, "object": "chat.completion.chunk", "choices": [choice]}

    class CompletionRender(Render):
        """Text completions and their chunks."""

        def __call__(self, ident, created, generation, piece, first=False, final=False, usage_only=False):
            base = {"id": f"cmpl-{ident}", "object": "text_completion", "created": created, "model": engine.name, "system_fingerprint": engine.fingerprint[:16]}
            if usage_only:
                return {**base, "choices": [], "usage": usage(generation)}
            if final and not self.streaming:
                choice = {"index": 0, "text": generation.text, "finish_reason": generation.finish_reason, "logprobs": None}
                return {**base, "choices": [choice], "usage": usage(generation)}
            text = "" if first or final else piece
            choice = {"index": 0, "text": text, "finish_reason": generation.finish_reason if final else None, "logprobs": None}
            return {**base, "choices": [choice]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, **scheduler.load(), "prefix_cache": prefix_cache.stats()}

    @app.get("/v1/models", responses={401: ERROR_RESPONSES[401]})
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "spikingbrain"}]}

    def prepare_chat(raw: bytes):
        req = parse_request(ChatRequest, raw)
        if not req.messages:
            raise APIError(400, "field 'messages': the list is empty; send at least one message", param="messages", code="empty_messages")
        for i, message in enumerate(req.messages):
            if message.content is None and message.role != "assistant":
                raise APIError(400, f"field 'messages.{i}.content': only an assistant message may have null content", param=f"messages.{i}.content", code="invalid_value")
        if req.tools:
            raise APIError(400, "field 'tools': tool calls are not supported", param="tools", code="unsupported_value")
        params = sampling(req, req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens)
        ids = encode(engine.render_chat([{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)} for m in req.messages]), "messages")
        check_prompt(ids, "messages")
        return req, ids, params

    def prepare_completion(raw: bytes):
        req = parse_request(CompletionRequest, raw)
        if req.echo or req.suffix:
            raise APIError(400, "fields 'echo' and 'suffix' are not supported", param="echo" if req.echo else "suffix", code="unsupported_value")
        params = sampling(req, req.max_tokens)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, f"field 'prompt': one prompt per request is supported, got {len(prompt)}", param="prompt", code="unsupported_value")
            prompt = prompt[0]
        if isinstance(prompt, list):
            if any(not 0 <= t < engine.model.config.vocab_size for t in prompt):
                raise APIError(400, f"field 'prompt': token ids must be in [0, {engine.model.config.vocab_size})", param="prompt", code="invalid_value")
            ids = list(prompt)
        else:
            ids = encode(prompt, "prompt")
        check_prompt(ids, "prompt")
        return req, ids, params

    async def serve(request: Request, prepare, render_class):
        deadline = time.monotonic() + settings.request_timeout_s
        req, ids, params = await off_the_loop(prepare, await read_body(request), deadline)
        return await run_job(request, ids, params, deadline, bool(req.stream), render_class(req))

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(request: Request):
        return await serve(request, prepare_chat, ChatRender)

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(request: Request):
        return await serve(request, prepare_completion, CompletionRender)

    return app


def sse(payload: dict) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload)}\n\n"
