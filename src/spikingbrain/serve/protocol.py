"""The request side of the OpenAI-compatible API: the error shape, the request models and the one body parser.

Every body goes through :func:`parse_request`: UTF-8, JSON with at most :data:`MAX_JSON_DEPTH`
levels of nesting and numbers of at most :data:`MAX_NUMBER_CHARS` characters (finite, no
``NaN``), then the pydantic model with strict types. Text fields refuse lone surrogates, which no
tokenizer can read. Every refusal is an :class:`APIError` with an OpenAI-shaped body naming the
field.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

__all__ = [
    "checked_sampling",
    "APIError",
    "ErrorBody",
    "ChatRequest",
    "CompletionRequest",
    "Message",
    "CommonRequest",
    "MAX_JSON_DEPTH",
    "MAX_NUMBER_CHARS",
    "parse_request",
    "request_body_schemas",
]

MAX_JSON_DEPTH = 64
MAX_NUMBER_CHARS = 100


class APIError(Exception):
    """An error answered with an OpenAI-style body (and optional response headers)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = status, message, kind, param, code, headers

    def body(self) -> dict:
        """The JSON error body."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    """What went wrong, and which field."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


def checked_sampling(params):
    """``params`` (``engine.SamplingParams``) when its values are valid; else a 400 naming the first bad field."""
    problems = params.problems()
    if problems:
        name, message = problems[0]
        raise APIError(400, f"field '{name}': {message}", param=name, code="invalid_value")
    return params


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"lone surrogate {text[err.start]!r} at character {err.start}; send valid Unicode (surrogates only in pairs)") from None
    return text


#: A string without lone surrogates.
Text = Annotated[str, AfterValidator(_valid_unicode)]


class ToleratedModel(BaseModel):
    """Request models: strict types, unknown fields ignored (as OpenAI clients send many)."""

    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(ToleratedModel):
    """A text part of a message's content."""

    type: Literal["text"]
    text: Text


class Message(ToleratedModel):
    """One chat message (``content`` may be null for an assistant message, as OpenAI allows)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None


class StreamOptions(ToleratedModel):
    """Streaming options."""

    include_usage: bool = False


class CommonRequest(ToleratedModel):
    """Fields shared by completions and chat completions (``top_k``, ``repetition_penalty``: extensions)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | int | None = None


class ChatRequest(CommonRequest):
    """Body of ``/v1/chat/completions``."""

    messages: list[Message]
    max_completion_tokens: int | None = None
    tools: list | None = None


class CompletionRequest(CommonRequest):
    """Body of ``/v1/completions``."""

    prompt: Text | list[Text] | list[int]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


def _number(convert):
    def parse(literal: str):
        if len(literal) > MAX_NUMBER_CHARS:
            raise APIError(400, f"the request body has a number of {len(literal)} characters; numbers may have at most {MAX_NUMBER_CHARS}", code="invalid_json")
        value = convert(literal)
        if isinstance(value, float) and not math.isfinite(value):
            raise APIError(400, f"the number {literal} in the request body is out of range; send a finite number", code="invalid_json")
        return value

    return parse


def _not_json(constant: str):
    raise APIError(400, f"the request body contains {constant}, which is not JSON; send a finite number", code="invalid_json")


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in valid JSON ``text`` (strings removed, then a running count of brackets)."""
    brackets = np.frombuffer(_NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode(), dtype=np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max(initial=0))


def _json_object(raw: bytes) -> dict:
    too_deep = APIError(400, f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} deep; flatten it", code="invalid_json")
    try:
        text = raw.decode("utf-8")
        body = json.loads(text, parse_int=_number(int), parse_float=_number(float), parse_constant=_not_json)
    except RecursionError:
        raise too_deep from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid UTF-8 JSON ({err}); send a JSON object", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    if _nesting_depth(text) > MAX_JSON_DEPTH:
        raise too_deep
    return body


def _param_name(loc: tuple) -> str:
    names = [str(p) for p in loc if not (isinstance(p, str) and (p in {"str", "int", "float", "bool"} or "[" in p or "-" in p))]
    return ".".join(names)


def parse_request(model_class: type[ToleratedModel], raw: bytes):
    """The request model read from a raw body, or an :class:`APIError` 400 naming the field."""
    body = _json_object(raw)
    try:
        return model_class.model_validate(body)
    except ValidationError as err:
        first = max(err.errors(), key=lambda e: len(e["loc"]))  # the deepest: the member of a union that the input resembles
        param = _param_name(first["loc"])
        kind = first["type"]
        shown = json.dumps(first.get("input"))[:80] if kind not in ("missing", "value_error") else None
        detail = first["msg"] + (f" (got {shown})" if shown is not None else "")
        code = {"missing": "missing_field", "value_error": "invalid_value"}.get(kind, "invalid_type")
        raise APIError(400, f"field '{param}': {detail}", param=param, code=code) from None


def request_body_schemas(bodies: dict[str, type[BaseModel]]) -> tuple[dict, dict]:
    """OpenAPI ``requestBody`` objects per path and the component schemas they refer to."""
    components, request_bodies = {}, {}
    for path, model in bodies.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        reference = {"$ref": f"#/components/schemas/{model.__name__}"}
        request_bodies[path] = {"required": True, "content": {"application/json": {"schema": reference}}}
    return request_bodies, components
