"""OpenAI-compatible HTTP server: routes, limits and error bodies over the scheduler of :mod:`.scheduler`."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .engine import Engine, Generation, SamplingParams
from .reader import add_reader
from .protocol import APIError, checked_sampling, ChatRequest, CommonRequest, CompletionRequest, ErrorBody, Message, parse_request, request_body_schemas
from .scheduler import Job, PrefixCache, Scheduler, timeout_error

__all__ = ["ServerSettings", "PrefixCache", "Scheduler", "Job", "APIError", "create_app", "timeout_error"]


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
                # with "stream": true the answer is server-sent events
                ok = schema["paths"][path]["post"]["responses"]["200"].setdefault("content", {})
                ok["text/event-stream"] = {"schema": {  # one event: a chunk's JSON, then "[DONE]"
                    "type": "object", "required": ["data"],
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}
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

    async def read_body(request: Request, limit: int | None = None) -> bytes:
        """The raw body, refused over ``limit`` (default ``max_body_bytes``; 413) or when it does not arrive within ``body_timeout_s`` (408, connection closed)."""
        check_key(request)
        limit = settings.max_body_bytes if limit is None else limit
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes is over the limit of {limit} bytes", code="body_too_large")

        async def collect() -> bytes:
            parts, size = [], 0
            async for part in request.stream():
                parts.append(part)
                size += len(part)
                if size > limit:
                    raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
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
        return checked_sampling(params)

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

    add_reader(app, engine, scheduler, settings, check_key, read_body, Job)  # the page at / and /v1/documents
    return app


def sse(payload: dict) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload)}\n\n"
