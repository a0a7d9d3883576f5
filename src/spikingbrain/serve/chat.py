"""Conversations on an :class:`~spikingbrain.serve.engine.Engine`: a chat whose history lives in the model's state, and a question about a document whose state can be saved once and reused."""

from __future__ import annotations

import json
from pathlib import Path

from ..model.checkpoint import CheckpointError
from .engine import prefix_digest
from .snapshot import load_snapshot, save_snapshot, take_snapshot

__all__ = ["ChatSession", "split_document_prompt"]


def split_document_prompt(engine, document: str, question: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat prompt for a question about a document, cut right after the document.

    The first part (template start and document) is the same for every question, so its state
    can be saved once and reused.
    """
    marker = "\u0000"
    rendered = engine.render_chat([{"role": "user", "content": marker}])
    head, tail = rendered.split(marker, 1)
    return engine.encode_text(head + document), engine.encode_text(f"\n\n{question}" + tail)


class ChatSession:
    """A conversation whose history lives in a cache: each turn feeds only the tokens the cache has not read."""

    def __init__(self, engine, params, system: str | None = None):
        self.engine, self.params, self.system = engine, params, system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation."""
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.cache, self.ids = self.engine.model.new_cache(), []

    def turn(self, text: str):
        """Start the assistant's answer to ``text``; returns the generation to step (call ``finish`` after it)."""
        self.messages.append({"role": "user", "content": text})
        rendered = self.engine.render_chat(self.messages)
        said = self.engine.tokenizer.decode(self.ids, skip_special_tokens=False)
        if self.ids and rendered.startswith(said) and len(rendered) > len(said):
            ids = self.ids + self.engine.encode_text(rendered[len(said) :])
        else:  # the template rewrote the history: read it again
            self.cache, ids = self.engine.model.new_cache(), self.engine.encode_text(rendered)
        return self.engine.start(ids, self.params, self.cache)

    def finish(self, generation) -> None:
        """Keep the answer and the cache that read it."""
        self.messages.append({"role": "assistant", "content": generation.text})
        self.cache, self.ids = generation.cache, generation.all_ids

    def save(self, path: Path) -> int:
        """Write the conversation's state and messages to a snapshot file; returns its bytes."""
        read = self.ids[: self.cache.seen_tokens]
        snapshot = take_snapshot(self.cache, prefix_digest(self.engine.fingerprint, read), self.engine.fingerprint)
        snapshot.extra = {"chat_messages": json.dumps(self.messages), "chat_token_ids": json.dumps(self.ids)}
        save_snapshot(path, snapshot, self.engine.name)
        return snapshot.nbytes

    def load(self, path: Path) -> None:
        """Continue the conversation saved in a snapshot file."""
        snapshot = load_snapshot(path, self.engine.fingerprint)
        if "chat_messages" not in snapshot.extra:
            raise CheckpointError(f"{path}: no field 'chat_messages'; save it with /save in 'spikingbrain chat'")
        ids = json.loads(snapshot.extra["chat_token_ids"])
        if prefix_digest(self.engine.fingerprint, ids[: snapshot.token_count]) != snapshot.prefix_sha256:
            raise CheckpointError(f"{path}: field 'chat_token_ids' does not match 'prefix_sha256'; the file was edited, delete it")
        self.messages, self.ids, self.cache = json.loads(snapshot.extra["chat_messages"]), ids, snapshot.restore(self.engine.model)
