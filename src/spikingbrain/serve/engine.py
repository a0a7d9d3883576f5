"""Text generation on per-request caches: chunked prefill aligned to absolute positions, batched decoding, seeded sampling, stop strings.

A :class:`Generation` is a small state machine that a caller steps one unit of work at a time
(one prefill chunk or one decoded token), so a scheduler can interleave many of them. Prefill
chunks always end at multiples of ``chunk_size`` counted from the start of the sequence, so a
cache restored at such a boundary continues with exactly the computations of an uninterrupted
run.

:meth:`Engine.decode` decodes one token of many generations in one batched forward, each row on
its own cache. It always runs ``decode_rows`` rows (padding rows fill the rest), also for a
generation alone: the matmuls' rounding depends on the number of rows, not on what the other rows
hold, so a generation's tokens are the same whoever shares its steps.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..spiking.apply import current_spiking, observing_first_rows

__all__ = [
    "SamplingParams", "sample_token", "TextStream", "Engine", "Generation", "model_fingerprint", "prefix_digest", "MAX_STOP_STRINGS", "MAX_STOP_CHARS",
    "DECODE_ROWS",
]

#: At most this many stop strings per request (as OpenAI), each of at most this many characters.
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256

#: Rows of every batched decode step (the batch-invariance bucket; see docs/serving.md for its cost).
DECODE_ROWS = 8


@dataclass
class SamplingParams:
    """How to pick tokens: temperature 0 is greedy; ``top_k`` 0 and ``top_p`` 1 switch those filters off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def problems(self) -> list[tuple[str, str]]:
        """``(field, message)`` for every value out of range (empty when all are usable)."""
        found = []
        if not 0 <= self.temperature <= 100:
            found.append(("temperature", f"temperature must be between 0 and 100, got {self.temperature}"))
        if not 0 < self.top_p <= 1:
            found.append(("top_p", f"top_p must be in (0, 1], got {self.top_p}"))
        if self.top_k < 0:
            found.append(("top_k", f"top_k must be >= 0 (0 = off), got {self.top_k}"))
        if not self.repetition_penalty > 0:
            found.append(("repetition_penalty", f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"))
        if self.max_tokens < 1:
            found.append(("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}"))
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            found.append(("seed", f"seed must be in [-2**63, 2**64), got {self.seed}"))
        if any(not s for s in self.stop):
            found.append(("stop", "stop strings must not be empty"))
        if len(self.stop) > MAX_STOP_STRINGS:
            found.append(("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}"))
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            found.append(("stop", f"a stop string may have at most {MAX_STOP_CHARS} characters, got {max(map(len, self.stop))}"))
        return found

    def generator(self) -> torch.Generator:
        """A CPU random generator seeded with ``seed`` (or fresh entropy when there is none)."""
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator().manual_seed(seed)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, seen: torch.Tensor | None = None) -> int:
    """One token id from 1-D ``logits``: repetition penalty on ``seen`` ids, then greedy or temperature/top-k/top-p sampling.

    Computed in float64 with penalised logits clamped to finite values and the largest logit
    shifted to 0 before dividing by the temperature, so every accepted value (temperature
    5e-324, top_p 1e-320, repetition_penalty 1e-40) gives finite probabilities.
    """
    logits = logits.to(torch.float64, copy=True)
    if seen is not None and params.repetition_penalty != 1.0:
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        largest = torch.finfo(torch.float64).max
        logits = logits.clamp(-largest, largest)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = (logits - logits.max()) / params.temperature
    if 0 < params.top_k < logits.numel():
        threshold = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if params.top_p < 1.0:
        logits = _nucleus(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


#: Top-p first looks for the nucleus among this many most likely tokens (a full sort only when they hold too little mass).
NUCLEUS_CANDIDATES = 1024


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` with ``-inf`` for every token whose strictly more likely tokens already hold ``top_p`` of the mass.

    Sorting 49152 logits costs milliseconds per token; the nucleus of a trained model is usually
    among the few most likely tokens, so those are ranked first (``topk``), and every token past
    them is dropped once they hold ``top_p``.
    """
    probs = torch.softmax(logits, dim=-1)
    candidates = min(NUCLEUS_CANDIDATES, logits.numel())
    top, order = torch.topk(probs, candidates)
    if candidates < logits.numel() and float(top.sum()) < top_p:
        top, order = torch.sort(probs, descending=True)
    kept = torch.cumsum(top, dim=-1) - top < top_p  # mass of strictly more likely tokens
    kept[0] = True  # the most likely token always stays
    filtered = torch.full_like(logits, float("-inf"))
    filtered[order[kept]] = logits[order[kept]]
    return filtered


def _border_table(pattern: str) -> list[int]:
    """Knuth-Morris-Pratt table: for each prefix of ``pattern``, the length of its longest proper border."""
    border, k = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = border[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        border[i] = k
    return border


def _prefix_ending(text: str, pattern: str, border: list[int]) -> int:
    """Length of the longest proper prefix of ``pattern`` that ``text`` ends with, in time linear in ``len(pattern)``."""
    state = 0
    for char in text[max(0, len(text) - len(pattern) + 1) :]:
        while state and pattern[state] != char:
            state = border[state - 1]
        if pattern[state] == char:
            state += 1
    return state


class TextStream:
    """Turns generated token ids into text pieces, holding back incomplete characters and possible stop-string starts."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.borders = [_border_table(s) for s in self.stop]
        self.longest = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now final (``stopped`` turns true when a stop string appears)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        start = max(0, self.emitted - self.longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit_to(min(hits))
        if self.text.endswith("\ufffd"):
            return ""
        held = max((_prefix_ending(self.text, s, border) for s, border in zip(self.stop, self.borders)), default=0)
        return self._emit_to(len(self.text) - held)

    def flush(self) -> str:
        """The text still held back (call when generation ends for another reason than a stop string)."""
        return "" if self.stopped else self._emit_to(len(self.text))

    def _emit_to(self, end: int) -> str:
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def model_fingerprint(model) -> str:
    """A short hash of a model's layout, spiking settings and weights (shapes, sums and edge values of every tensor):
    a dense and a spiking model of the same weights compute different states, so their keys differ."""
    digest = hashlib.sha256()
    config = model.config
    spiking = current_spiking(model)
    digest.update(repr((list(config.layer_mixers), config.attention_window, config.vocab_size, sorted((spiking or {}).items()))).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1).float()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}{float(flat.double().sum()):.10e}".encode())
            digest.update(flat[:64].numpy().tobytes() + flat[-64:].numpy().tobytes())
    return digest.hexdigest()[:32]


def prefix_digest(fingerprint: str, ids: list[int]) -> str:
    """The hex key of a token prefix under a model fingerprint."""
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def _stop_ids(model, tokenizer) -> set[int]:
    found = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        found.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None)
    return found


class Engine:
    """A loaded model and tokenizer with prompt encoding, aligned chunked prefill and batched decoding over ``decode_rows`` rows
    (``packed_decode``: with oneDNN-packed weights, see :mod:`spikingbrain.model.packed`)."""

    def __init__(self, model, tokenizer, name: str, chunk_size: int = 256, decode_rows: int = DECODE_ROWS, packed_decode: bool = True):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if decode_rows < 1:
            raise ValueError(f"decode_rows must be >= 1, got {decode_rows}")
        self.model, self.tokenizer, self.name, self.chunk_size = model, tokenizer, name, chunk_size
        self.decode_rows, self.packed_decode = decode_rows, packed_decode
        self.eos_ids = _stop_ids(model, tokenizer)
        self.fingerprint = model_fingerprint(model)
        self.max_token_chars = max(1, max(len(t or "") for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))))

    def certainly_over(self, text: str, max_tokens: int) -> bool:
        """Whether ``text`` has more than ``max_tokens`` tokens, told from its length alone (no token is longer than ``max_token_chars``)."""
        return len(text) > max_tokens * self.max_token_chars

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens added)."""
        return self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids  # no warning past 8k tokens

    def render_chat(self, messages: list[dict]) -> str:
        """The chat-template text of ``messages`` ending with the assistant's turn (plain lines without a template)."""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` in the model's chat template, ready for the assistant's answer."""
        return self.encode_text(self.render_chat(messages))

    def chunk_ends(self, start: int, stop: int) -> list[int]:
        """Ends of the prefill chunks that cover positions ``start..stop``: multiples of ``chunk_size``, then ``stop``."""
        ends = list(range((start // self.chunk_size + 1) * self.chunk_size, stop, self.chunk_size))
        return ends + [stop] if stop > start else []

    @torch.inference_mode()
    def forward(self, ids: list[int], cache) -> torch.Tensor:
        """Run ``ids`` through ``cache`` and return the logits after the last one."""
        out = self.model(torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    def prefill(self, ids: list[int], cache, on_chunk: Callable[[int], None] | None = None) -> torch.Tensor | None:
        """Feed ``ids`` after the cache's ``seen_tokens`` in aligned chunks; logits after the last (None if none fed)."""
        logits, start = None, cache.seen_tokens
        for end in self.chunk_ends(start, start + len(ids)):
            logits = self.forward(ids[cache.seen_tokens - start : end - start], cache)
            if on_chunk is not None:
                on_chunk(end)
        return logits

    def decode(self, generations: list["Generation"]) -> list[str]:
        """Decode one token of each generation (all past their prefill), ``decode_rows`` rows per forward; the new text of each.

        A generation whose cache holds the model's ``max_sequence_length`` already ends with
        finish reason ``length`` instead of taking part.
        """
        if any(g.done or g.prefilling for g in generations):
            raise ValueError("decode takes generations that have finished their prefill and are not done")
        limit = self.model.config.max_sequence_length
        pieces = {id(g): g.end_at_context_limit() for g in generations if limit is not None and g.cache.seen_tokens >= limit}
        rows = [g for g in generations if id(g) not in pieces]
        for start in range(0, len(rows), self.decode_rows):
            group = rows[start : start + self.decode_rows]
            padding = self.decode_rows - len(group)
            ids = torch.tensor([g.pending for g in group] + [0] * padding).view(-1, 1)
            with observing_first_rows(self.model, len(group)):  # spike observers: not the padding rows
                logits = self.model.decode_rows(ids, [g.cache for g in group] + [None] * padding, packed=self.packed_decode)
            pieces.update((id(g), g.take_logits(row)) for g, row in zip(group, logits))
        return [pieces[id(g)] for g in generations]

    def start(self, prompt_ids: list[int], params: SamplingParams, cache=None, **kwargs) -> "Generation":
        """A generation for ``prompt_ids`` (``cache`` may already hold a prefix of them)."""
        return Generation(self, prompt_ids, params, self.model.new_cache() if cache is None else cache, **kwargs)


@dataclass
class Generation:
    """One request's progress: prefill chunks, then one token per ``step()``, until a stop condition."""

    engine: Engine
    prompt_ids: list[int]
    params: SamplingParams
    cache: object
    on_boundary: Callable[[int, object], None] | None = None
    finish_reason: str | None = None
    completion_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    first_token_time: float | None = None
    eos_token: int | None = None

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("the prompt is empty; give at least one token of text")
        if self.cache.seen_tokens >= len(self.prompt_ids):
            raise ValueError("the cache already covers the whole prompt; at least one prompt token must be fed")
        self.cached_tokens = self.cache.seen_tokens
        self.stream = TextStream(self.engine.tokenizer, self.params.stop)
        self.rng = self.params.generator()
        self.seen = torch.zeros(self.engine.model.config.vocab_size, dtype=torch.bool)
        self.seen[torch.tensor(self.prompt_ids)] = True
        self.pending: int | None = None  # sampled, not yet fed
        self.start_time = time.perf_counter()

    @property
    def done(self) -> bool:
        """Whether a stop condition was reached."""
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """Whether prompt tokens remain to be read (the first token comes with the last prefill chunk)."""
        return self.cache.seen_tokens < len(self.prompt_ids)

    @property
    def all_ids(self) -> list[int]:
        """Prompt, completion and the end-of-sequence token if one was sampled (the cache has read all but the last)."""
        return self.prompt_ids + self.completion_ids + ([] if self.eos_token is None else [self.eos_token])

    def step(self) -> str:
        """Do one prefill chunk or decode one token (a batched step of its own); return the new final text (possibly empty)."""
        if self.done:
            return ""
        return self.prefill_chunk() if self.prefilling else self.engine.decode([self])[0]

    def prefill_chunk(self) -> str:
        """Read the next aligned chunk of the prompt; after the last one, sample the first token and return its text."""
        seen, n = self.cache.seen_tokens, len(self.prompt_ids)
        end = self.engine.chunk_ends(seen, n)[0]
        logits = self.engine.forward(self.prompt_ids[seen:end], self.cache)
        if end % self.engine.chunk_size == 0 and self.on_boundary is not None:
            self.on_boundary(end, self.cache)
        return self.take_logits(logits) if end == n else ""

    def take_logits(self, logits: torch.Tensor) -> str:
        """Sample the next token from ``logits`` and return the text that is now final."""
        return self._take(sample_token(logits, self.params, self.rng, self.seen))

    def end_at_context_limit(self) -> str:
        """Finish with reason ``length`` because the cache is full; return the text held back until now."""
        self.finish_reason = "length"
        return self.stream.flush()

    def _take(self, token: int) -> str:
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        if token in self.engine.eos_ids:
            self.finish_reason, self.eos_token = "stop", token
            return self.stream.flush()
        self.completion_ids.append(token)
        self.seen[token] = True
        self.pending = token
        piece = self.stream.push(token)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif len(self.completion_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
            piece += self.stream.flush()
        return piece

    def run(self) -> Iterator[str]:
        """Step until done, yielding the text pieces."""
        while not self.done:
            piece = self.step()
            if piece:
                yield piece

    @property
    def text(self) -> str:
        """The completion text emitted so far."""
        return self.stream.text[: self.stream.emitted]

    @property
    def ttft(self) -> float | None:
        """Seconds from the start of this generation to its first sampled token."""
        return None if self.first_token_time is None else self.first_token_time - self.start_time
