"""Training text: loading documents, a held-out split, tokenising, packing, batches and teacher-sampled text.

Sources are ``.txt`` / ``.md`` files (one document each), ``.jsonl`` files (one document per
line: field ``text``, or fields ``prompt`` and ``answer`` for a chat example), folders of them,
or ``pydoc`` (Python's own ``pydoc_data.topics``, one document per topic). Documents are split
by a hash of their names, so training never sees held-out text; packed rows join documents
with a separator token after each one. A chat example is rendered in the model's chat template
and its loss mask covers the answer only; plain text is scored everywhere.
"""

from __future__ import annotations

from collections import deque

import hashlib
import json
import math
import os
import random
import sys
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path

import torch

from ..runtime.text import read_text
from .options import PYDOC, TEXT_SUFFIXES

__all__ = [
    "chat_prompt_ids",
    "Document",
    "TEXT_SUFFIXES",
    "load_documents",
    "split_held_out",
    "separator_for",
    "tokenize_documents",
    "encode_documents",
    "encode_chat_example",
    "joined_token_ids",
    "packed_rows_with_targets",
    "pack",
    "pack_loss_masks",
    "row_fitting_order",
    "PackedBatches",
    "synth_documents",
    "write_jsonl",
    "write_text",
    "write_split",
]


@dataclass
class Document:
    """One training or evaluation document; ``key`` (default: the name) decides its side of the held-out split."""

    name: str
    text: str
    key: str = ""
    #: Set for a chat example: ``text`` is the user's prompt, this the assistant's answer (the only part scored).
    answer: str | None = None
    #: Further ``(question, answer)`` turns of a chat example, all answers scored.
    follow_ups: tuple[tuple[str, str], ...] = ()

    @property
    def split_key(self) -> str:
        """What the held-out split hashes: independent of where a data folder lies on disk."""
        return self.key or self.name


# ----------------------------------------------------------------------------- loading


def _chat_turns(messages, where: str) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs of a ``messages`` list: user and assistant turns in turn, ending with an answer."""
    example = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
    if not isinstance(messages, list) or not messages or len(messages) % 2:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of user and assistant turns in pairs; write {example}")
    turns = []
    for index, message in enumerate(messages):
        role = "user" if index % 2 == 0 else "assistant"
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict) or message.get("role") != role or not isinstance(content, str):
            raise ValueError(f"{where}: message {index} must be {{\"role\": \"{role}\", \"content\": \"...\"}} "
                             f"(turns alternate user, assistant), got {message!r:.80}")
        if role == "assistant":
            if not content.strip():
                raise ValueError(f"{where}: message {index}, an answer, is empty; give it the answer to train on")
            turns.append((messages[index - 1]["content"], content))
    return turns


def _jsonl_document(record, name: str, where: str) -> Document | None:
    """The document of one JSON line: ``{"text"}``, or ``{"prompt", "answer"}`` or ``{"messages"}`` for a chat
    example; None when blank."""
    if isinstance(record, dict) and "messages" in record:
        (prompt, answer), *follow_ups = _chat_turns(record["messages"], where)
        return Document(name, prompt, answer=answer, follow_ups=tuple(follow_ups))
    if isinstance(record, dict) and "answer" in record:
        prompt, answer = record.get("prompt"), record["answer"]
        if not (isinstance(prompt, str) and isinstance(answer, str)):
            raise ValueError(f"{where}: a chat example needs string fields 'prompt' and 'answer' (got "
                             f"{type(prompt).__name__} and {type(answer).__name__}); write {{\"prompt\": \"...\", \"answer\": \"...\"}}")
        if not answer.strip():
            raise ValueError(f"{where}: the chat example's 'answer' is empty; give it the answer to train on, or drop the line")
        return Document(name, prompt, answer=answer)
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(
            f"{where}: no string field 'text' (got {type(text).__name__}); "
            'write each line as {"text": "..."} or, for a chat example, {"prompt": "...", "answer": "..."} '
            'or {"messages": [...]}'
        )
    return Document(name, text) if text.strip() else None


def _read_jsonl(path: Path) -> list[Document]:
    """One document per line of a JSON-lines file (see :func:`_jsonl_document`); blank lines and blank texts are skipped."""
    documents = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: invalid JSON ({err.msg}); write one JSON object per line") from None
        document = _jsonl_document(record, f"{path}:{number}", f"{path}, line {number}")
        if document is not None:
            documents.append(document)
    if not documents:
        raise ValueError(f"{path}: no line has any text; add lines like {{\"text\": \"...\"}}")
    return documents


def _read_file(path: Path) -> list[Document]:
    """The documents of one data file, chosen by its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix in (".txt", ".md"):
        return [Document(str(path), read_text(path))]
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(TEXT_SUFFIXES)} files or a folder of them")


def _pydoc_documents() -> list[Document]:
    """Python's own documentation topics, one document per topic, sorted by topic."""
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{name}", topics[name]) for name in sorted(topics)]


def load_documents(sources: list[str | Path]) -> list[Document]:
    """Documents from files, folders (recursively, sorted) and the short name ``pydoc``, in the order given."""
    if not sources:
        raise ValueError(f"no data sources given; pass files ({', '.join(TEXT_SUFFIXES)}), folders or '{PYDOC}'")
    documents: list[Document] = []
    for source in sources:
        if str(source) == PYDOC:
            documents += _pydoc_documents()
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise ValueError(f"{path}: the folder has no {', '.join(TEXT_SUFFIXES)} files; add some or pass the files")
            for file in files:
                relative = str(file.relative_to(path))
                documents += [replace(doc, key=relative + doc.name[len(str(file)) :]) for doc in _read_file(file)]
        elif path.is_file():
            documents += [replace(doc, key=path.name + doc.name[len(str(path)) :]) for doc in _read_file(path)]
        else:
            raise ValueError(f"{path}: no such file or folder; pass an existing file, a folder or '{PYDOC}'")
    return documents


# ----------------------------------------------------------------------------- held-out split


def _unit_hash(name: str, seed: int) -> float:
    """A value in [0, 1) fixed by ``name`` and ``seed`` (SHA-256, the same in every process)."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_held_out(documents: list[Document], fraction: float = 0.1, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """``(train, held_out)``: whole documents by a hash of name and seed; a single document is cut in two."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be between 0 and 1 (exclusive), got {fraction}")
    if not documents:
        raise ValueError("no documents to split; load some text first")
    if len(documents) == 1:
        (doc,) = documents
        if len(doc.text) < 2:
            raise ValueError(f"{doc.name}: a single document of {len(doc.text)} character(s) cannot be split; add text")
        cut = min(max(round(len(doc.text) * (1.0 - fraction)), 1), len(doc.text) - 1)
        return [Document(f"{doc.name}#train", doc.text[:cut])], [Document(f"{doc.name}#held_out", doc.text[cut:])]
    keys = [_unit_hash(doc.split_key, seed) for doc in documents]
    held = [key < fraction for key in keys]
    if not any(held):
        held[keys.index(min(keys))] = True
    if all(held):
        held[keys.index(max(keys))] = False
    train = [doc for doc, h in zip(documents, held) if not h]
    return train, [doc for doc, h in zip(documents, held) if h]


# ----------------------------------------------------------------------------- tokens and packing


def separator_for(tokenizer) -> int:
    """The tokenizer's end-of-sequence id, the default document separator."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id to separate documents; pass separator_id explicitly")
    return int(tokenizer.eos_token_id)


def tokenize_documents(documents: list[Document], tokenizer, separator_id: int | None = None) -> list[list[int]]:
    """Token ids of each document (see :func:`encode_documents`)."""
    return [ids for ids, _ in encode_documents(documents, tokenizer, separator_id)]


def encode_documents(documents: list[Document], tokenizer, separator_id: int | None = None) -> list[tuple[list[int], list[bool] | None]]:
    """``(ids, loss_mask)`` of each document: plain text with no special tokens added and special-token text read as
    plain text (mask None: every token is scored); a chat example in the chat template with the answer-only mask.

    Plain text that still contains ``separator_id`` (default: the tokenizer's EOS) is an error,
    since packing uses that id to mark where documents end.
    """
    separator = separator_for(tokenizer) if separator_id is None else int(separator_id)
    plain = [doc for doc in documents if doc.answer is None]
    encoded = tokenizer(
        [doc.text for doc in plain], add_special_tokens=False, split_special_tokens=True, verbose=False
    )["input_ids"] if plain else []
    for doc, ids in zip(plain, encoded):
        if separator in ids:
            raise ValueError(
                f"{doc.name}: the text contains the separator token {separator} "
                f"({tokenizer.convert_ids_to_tokens(separator)!r}); remove it or choose another separator_id"
            )
    plain_ids = iter(encoded)
    result = []
    for doc in documents:
        if doc.answer is None:
            result.append((list(next(plain_ids)), None))
            continue
        try:
            result.append(encode_chat_example(tokenizer, doc.text, doc.answer, follow_ups=doc.follow_ups))
        except ValueError as err:
            raise ValueError(f"{doc.name}: {err}") from None
    return result


def joined_token_ids(documents: list[Document], tokenizer, max_tokens: int | None = None,
                     separator_id: int | None = None) -> torch.LongTensor:
    """The documents' ids each followed by the separator (default EOS), as one 1-D tensor of at most ``max_tokens``:
    the text a held-out perplexity is measured on, joined as training packs it."""
    separator = separator_for(tokenizer) if separator_id is None else int(separator_id)
    flat = [t for ids in tokenize_documents(documents, tokenizer, separator) for t in (*ids, separator)]
    return torch.tensor(flat[:max_tokens], dtype=torch.long)


def pack(token_lists: list[list[int]], seq_len: int, separator_id: int) -> torch.LongTensor:
    """Rows ``[N, seq_len]`` of the documents joined with ``separator_id`` after each; the incomplete tail is dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    total = sum(len(ids) + 1 for ids in token_lists)
    if total < seq_len:
        raise ValueError(
            f"only {total} tokens ({len(token_lists)} documents with separators), fewer than one row of "
            f"seq_len={seq_len}; add text or lower the sequence length"
        )
    flat = torch.tensor(list(chain.from_iterable(chain(ids, (separator_id,)) for ids in token_lists)), dtype=torch.long)
    rows = total // seq_len
    return flat[: rows * seq_len].view(rows, seq_len)


def row_fitting_order(token_lists: list[list[int]], loss_masks: list[list[bool] | None], seq_len: int) -> list[int]:
    """An order of the documents for :func:`pack` in which chat examples (a mask) land whole in one row.

    Chat examples go in their order, each as soon as the current row has room for all of it;
    plain text, in its order, fills the gaps and may run across rows. Chat examples longer than
    a row count as plain text, and chat examples left when the plain text runs out come last.
    (Training draws rows in random order, so where in the stream a document lands does not matter.)
    """
    whole = [i for i, (ids, m) in enumerate(zip(token_lists, loss_masks)) if m is not None and len(ids) <= seq_len]
    chats, taken = deque(whole), set(whole)
    plain = deque(i for i in range(len(token_lists)) if i not in taken)
    order, position = [], 0
    while chats or plain:
        fits = chats and len(token_lists[chats[0]]) <= seq_len - position % seq_len
        index = chats.popleft() if fits or not plain else plain.popleft()
        order.append(index)
        position += len(token_lists[index]) + 1
    return order


def pack_loss_masks(token_lists: list[list[int]], loss_masks: list[list[bool] | None], seq_len: int) -> torch.BoolTensor:
    """Which tokens of :func:`pack`'s rows are scored as next-token targets, ``[N, seq_len]``.

    Plain text (mask None) and its separator are scored everywhere; a chat example only where
    its mask says, and not at all when it straddles two rows (its answer would lose the prompt).
    """
    flags, position = [], 0
    for ids, mask in zip(token_lists, loss_masks):
        if mask is None:
            flags.append([True] * (len(ids) + 1))
        else:
            whole_in_one_row = position // seq_len == (position + len(ids) - 1) // seq_len
            flags.append([bool(m) and whole_in_one_row for m in mask] + [False])
        position += len(ids) + 1
    flat = torch.tensor(list(chain.from_iterable(flags)), dtype=torch.bool)
    rows = position // seq_len
    return flat[: rows * seq_len].view(rows, seq_len)


def packed_rows_with_targets(token_lists: list[list[int]], loss_masks: list[list[bool] | None], seq_len: int,
                             separator_id: int) -> tuple[torch.LongTensor, torch.Tensor]:
    """Rows of documents with chat examples (a mask) placed whole (:func:`row_fitting_order`) and their target codes:
    0 not scored, 1 a plain-text token, 2 a chat answer's token (``uint8``, ``[N, seq_len]``).

    Rows in which nothing is scored (only pieces of chat examples that straddle rows, which happens once the
    plain text runs out) are left out: a step on one would train nothing.
    """
    order = row_fitting_order(token_lists, loss_masks, seq_len)
    token_lists, loss_masks = [token_lists[i] for i in order], [loss_masks[i] for i in order]
    scored = pack_loss_masks(token_lists, loss_masks, seq_len)
    answers = pack_loss_masks(token_lists, [[False] * len(ids) if m is None else m for ids, m in zip(token_lists, loss_masks)], seq_len)
    targets = scored.to(torch.uint8) + answers.to(torch.uint8)
    keep = scored.any(dim=1)
    return pack(token_lists, seq_len, separator_id)[keep], targets[keep]


def _epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of one epoch's shuffle, fixed by ``(seed, epoch)``."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{epoch}".encode()).digest()[:8], "big") >> 1


class PackedBatches:
    """Endless ``[batch_size, seq_len]`` batches of packed rows, reshuffled every epoch, with exact resume.

    Batches run across epoch boundaries, so every row is used once per epoch whatever the
    batch size. ``state_dict()`` after k batches and ``load_state_dict`` on a fresh instance
    with the same rows give the same next batches as continuing.
    """

    def __init__(self, rows: torch.LongTensor, batch_size: int, seed: int, loss_mask: torch.Tensor | None = None):
        if rows.dim() != 2 or rows.shape[0] < 1:
            raise ValueError(f"rows must be a non-empty [N, seq_len] tensor, got shape {tuple(rows.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if loss_mask is not None and loss_mask.shape != rows.shape:
            raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)}, the rows {tuple(rows.shape)}; pack both from the same documents")
        self.rows, self.batch_size, self.seed, self.loss_mask = rows, batch_size, seed, loss_mask
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    @property
    def seq_len(self) -> int:
        """Tokens per row."""
        return self.rows.shape[1]

    @property
    def tokens_per_batch(self) -> int:
        """Tokens in one batch."""
        return self.batch_size * self.seq_len

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(self.rows.shape[0], generator=generator)

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> torch.LongTensor:
        return self.next_with_mask()[0]

    def next_with_mask(self) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """The next batch and its rows of ``loss_mask`` (a boolean mask or the trainer's target codes; None without one)."""
        picked, count = [], 0
        while count < self.batch_size:
            take = min(self.batch_size - count, len(self._order) - self.position)
            picked.append(self._order[self.position : self.position + take])
            self.position, count = self.position + take, count + take
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        index = torch.cat(picked)
        return self.rows[index], None if self.loss_mask is None else self.loss_mask[index]

    def state_dict(self) -> dict:
        """Position in the stream: epoch, row position in the epoch, seed, and the shape it applies to."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rows": self.rows.shape[0],
                "seq_len": self.seq_len, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()`` of a stream over the same rows and batch size."""
        mine = self.state_dict()
        for key in ("rows", "seq_len", "batch_size"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"data state was saved for {key}={state.get(key)}, these batches have {key}={mine[key]}; "
                    "resume with the same data, sequence length and batch size"
                )
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


# ----------------------------------------------------------------------------- synthetic text

SYNTH_TOPICS = (
    "the ocean", "volcanoes", "the history of writing", "honey bees", "black holes", "the Roman Empire",
    "photosynthesis", "a lighthouse keeper", "chess", "the invention of the printing press", "rainforests",
    "friendship", "the water cycle", "electric cars", "ancient Egypt", "learning a new language", "the Moon",
    "climate change", "a small bakery", "the human heart", "trains", "music and memory", "deserts",
    "the internet", "a lost dog", "mountains", "recycling", "the Olympic Games", "dinosaurs", "gardening",
    "computers", "a rainy day", "the solar system", "coffee", "bridges", "sleep", "robots", "birds", "maps",
    "a school trip", "vaccines", "the Renaissance", "rivers", "kindness", "bicycles", "earthquakes", "time",
)
SYNTH_REQUESTS = (
    "Write a short essay about {}.",
    "Tell me a story about {}.",
    "Explain {} to a curious student.",
    "Write a blog post about {}.",
    "What are some interesting facts about {}?",
    "Describe {} in detail.",
)


def _default_prompts(tokenizer, seed: int) -> list[list[int]]:
    """Prompt ids: chat-template requests over topics (shuffled by ``seed``), or BOS alone without a template."""
    if not getattr(tokenizer, "chat_template", None):
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("the tokenizer has neither a chat template nor a BOS/EOS token to start from; pass prompts")
        return [[int(start)]]
    texts = [request.format(topic) for topic in SYNTH_TOPICS for request in SYNTH_REQUESTS]
    random.Random(seed).shuffle(texts)
    return [chat_prompt_ids(tokenizer, text) for text in texts]


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """Ids of one user message in the chat template, ready for the assistant's answer (plain text without a template)."""
    if not tokenizer.chat_template:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": text}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


# ----------------------------------------------------------------------------- chat examples: the answer-only loss mask

TRUNCATION_MARK = "\n\n[...]\n\n"


def _answer_spans(tokenizer, turns: list[tuple[str, str]]) -> tuple[list[int], list[tuple[int, int]]]:
    """``(ids, spans)``: the rendered conversation of ``(question, answer)`` turns and, for each answer, the slice of
    its tokens plus its end-of-turn token."""
    messages, spans, ids = [], [], []
    eos = tokenizer.eos_token_id
    for question, answer in turns:
        messages.append({"role": "user", "content": question})
        prefix = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
        messages.append({"role": "assistant", "content": answer})
        rendered = list(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"])
        if prefix[: len(ids)] != ids or rendered[: len(prefix)] != prefix or eos not in rendered[len(prefix):]:
            raise ValueError("the chat template does not render each turn as a prefix of the conversation, ending the "
                             "assistant's turns with EOS; encode_chat_example needs such a template")
        ids = rendered
        spans.append((len(prefix), len(ids) - ids[::-1].index(eos)))
    return ids, spans


def encode_chat_example(tokenizer, prompt: str, answer: str, max_len: int | None = None,
                        follow_ups: tuple[tuple[str, str], ...] = ()) -> tuple[list[int], list[bool]]:
    """``(input_ids, loss_mask)`` of a user turn holding ``prompt`` and an assistant turn holding ``answer`` in the chat
    template, then the ``follow_ups`` turns; True on every answer and its end token.

    Over ``max_len`` tokens the middle of the prompt is cut (its start and its end, where the
    question usually stands, are kept, joined by ``[...]``); answers that cannot fit even
    with an empty prompt are an error.
    """
    later = list(follow_ups)
    ids, spans = _answer_spans(tokenizer, [(prompt, answer), *later])
    if max_len is not None and len(ids) > max_len:
        floor = len(_answer_spans(tokenizer, [("", answer), *later])[0])
        if floor > max_len:
            raise ValueError(f"the answers take {floor} tokens with the chat template and an empty prompt, more than "
                             f"max_len={max_len}; raise max_len or leave the item out")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        keep = len(prompt_ids)
        while len(ids) > max_len:
            keep -= len(ids) - max_len
            if keep <= 0:
                ids, spans = _answer_spans(tokenizer, [("", answer), *later])
                break
            head = tokenizer.decode(prompt_ids[: (keep + 1) // 2])
            tail = tokenizer.decode(prompt_ids[len(prompt_ids) - keep // 2 :]) if keep > 1 else ""
            ids, spans = _answer_spans(tokenizer, [(head + TRUNCATION_MARK + tail, answer), *later])
    mask = [False] * len(ids)
    for start, end in spans:
        mask[start:end] = [True] * (end - start)
    return ids, mask


def synth_documents(
    model,
    tokenizer,
    tokens: int,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    seed: int = 0,
    prompts: list[str] | None = None,
    progress: bool = True,
) -> list[Document]:
    """Text sampled from a teacher (temperature 1.0, top-p 0.95) in batches until about ``tokens`` tokens.

    Prompts cycle through ``prompts`` (wrapped in the chat template when there is one) or
    built-in requests for essays, stories and explanations; only the answers are kept.
    Sampling is seeded by ``seed`` without touching the caller's random state.
    """
    from tqdm.auto import tqdm

    if tokens < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"tokens, batch_size and max_new_tokens must be >= 1, got {tokens}, {batch_size}, {max_new_tokens}")
    if prompts is None:
        prompt_ids = _default_prompts(tokenizer, seed)
    elif getattr(tokenizer, "chat_template", None):
        prompt_ids = [chat_prompt_ids(tokenizer, text) for text in prompts]
    else:
        prompt_ids = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in prompts]
    if not prompt_ids:
        raise ValueError("prompts is empty; pass at least one prompt or None for the built-in ones")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    documents: list[Document] = []
    made, batch_index = 0, 0
    bar = tqdm(total=tokens, desc="synth", unit="tok", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        while made < tokens:
            remaining = tokens - made
            rows = min(batch_size, math.ceil(remaining / max_new_tokens))
            new = min(max_new_tokens, remaining)
            batch = [prompt_ids[(batch_index * batch_size + i) % len(prompt_ids)] for i in range(rows)]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=model.device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=model.device)
            out = model.generate(
                input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                max_new_tokens=new, min_new_tokens=min(16, new), pad_token_id=pad, eos_token_id=eos,
            )
            added = 0
            for row in out[:, width:].tolist():
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                if text:
                    documents.append(Document(f"synth:{seed}:{len(documents)}", text))
                    added += len(row)
            if added == 0:
                raise ValueError("the teacher produced no text for a whole batch; check the model, tokenizer and prompts")
            bar.update(min(added, tokens - made))
            made += added
            batch_index += 1
    bar.close()
    return documents


# ----------------------------------------------------------------------------- writing


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: str | Path, documents: list[Document]) -> Path:
    """Write documents as JSON lines ``{"text": ...}`` atomically."""
    return write_text(path, "".join(json.dumps({"text": doc.text}, ensure_ascii=False) + "\n" for doc in documents))


def write_split(sources: list[str], held_out_fraction: float, seed: int, out: str | Path) -> dict:
    """Split the documents of ``sources`` into ``out/train.jsonl`` and ``out/held_out.txt``; returns their counts."""
    train, held_out = split_held_out(load_documents(sources), held_out_fraction, seed)
    out = Path(out)
    write_jsonl(out / "train.jsonl", train)
    write_text(out / "held_out.txt", "\n\n".join(doc.text for doc in held_out) + "\n")
    return {
        "train_documents": len(train),
        "held_out_documents": len(held_out),
        "train_characters": sum(len(doc.text) for doc in train),
        "held_out_characters": sum(len(doc.text) for doc in held_out),
        "train": str(out / "train.jsonl"),
        "held_out": str(out / "held_out.txt"),
    }
