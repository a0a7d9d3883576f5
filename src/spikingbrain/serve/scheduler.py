"""The scheduler thread that owns the model, the jobs it serves and the prefix state cache.

One scheduler thread owns the model. Each request gets its own cache and generation. Every
turn of the scheduler (continuous batching):

1. admits waiting jobs up to ``max_active``;
2. decodes one token of *every* job past its prefill in one batched forward
   (:meth:`Engine.decode`: each row on its own cache, in a fixed number of rows, so a request's
   tokens do not depend on its neighbours);
3. reads one prefill chunk (at most ``chunk_size`` tokens) of the job still reading its prompt
   that read least recently (a newly admitted one first): a long document being read costs the
   others one chunk per turn, and a short prompt's first chunk waits only for the chunk being
   read when it arrives.

Prompts are prefilled in chunks that end at multiples of the chunk size; the cache after such
a boundary is kept in a :class:`PrefixCache` under the hash of the tokens before it, so a later
prompt that shares the prefix (the same long document, the same system prompt) starts from there.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..model.checkpoint import CheckpointError
from .engine import Engine, Generation, SamplingParams, prefix_digest
from .protocol import APIError
from .snapshot import Snapshot, load_snapshot, save_snapshot, take_snapshot

__all__ = ["PrefixCache", "Job", "Scheduler", "timeout_error"]


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

    A job submitted with ``generation`` already set (anything with ``step()``, ``done``,
    ``prefilling`` and a cache) is stepped as is, without a prefix-cache lookup: the document
    reader starts its questions from a kept document state that way. A :class:`Generation`
    decodes in the shared batched step; another object (a wrapper) decodes through its own
    ``step()``, in a batch of its own. With ``progress`` the job also gets a ``("progress",
    tokens read)`` event after every prefill chunk that is not its last.
    """

    prompt_ids: list[int]
    params: SamplingParams
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    generation: Generation | None = None
    progress: bool = False
    last_read: int = -1  # the scheduler's count of prefill chunks when this job last read one

    def send(self, kind: str, value) -> None:
        """Hand an event to the request's coroutine (called from the scheduler thread); dropped once its loop is closed."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the server is shutting down
            self.cancelled = True


class Scheduler:
    """The thread that owns the model: admits jobs, restores prefixes, decodes all active generations in one batched
    step per turn and reads one prefill chunk between two such steps."""

    def __init__(self, engine: Engine, prefix_cache: PrefixCache, max_active: int = 8):
        self.engine, self.prefix_cache, self.max_active = engine, prefix_cache, max_active
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        self.condition = threading.Condition()
        self.stopped = False
        self.cancelled = 0
        self.admitting = 0  # jobs taken from the queue and not yet active or dropped (counted as waiting)
        self.decode_steps = self.decoded_tokens = self.prefill_chunks = 0
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
        """Active and waiting job counts, jobs dropped because their client left, and the batched work done so far;
        once ``active`` and ``waiting`` are both 0, every job submitted before is counted where it ended."""
        with self.condition:
            return {
                "active": len(self.active),
                "waiting": len(self.waiting) + self.admitting,
                "cancelled": self.cancelled,
                "decode_steps": self.decode_steps,
                "decoded_tokens": self.decoded_tokens,
                "prefill_chunks": self.prefill_chunks,
            }

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.stopped and not self.waiting and not self.active:
                    self.condition.wait()
                if self.stopped:
                    return
                admitted = self.waiting[: self.max_active - len(self.active)]
                del self.waiting[: len(admitted)]
                self.admitting = len(admitted)
            for job in admitted:
                self._guard(job, self._admit)
                with self.condition:  # active, dropped (and counted) or failed: /health sees it in one place at all times
                    self.admitting -= 1
            self._turn()

    def _turn(self) -> None:
        """Drop left or late jobs, decode every decoding job (one batched step), then one prefill chunk."""
        for job in list(self.active):
            self._guard(job, self._check)
        decoding = [job for job in self.active if not job.generation.prefilling]
        batched = [job for job in decoding if isinstance(job.generation, Generation)]
        if batched:
            self._decode(batched)
        for job in decoding:
            if job not in batched:
                self._guard(job, self._step)
        reading = min((job for job in self.active if job.generation.prefilling), key=lambda job: job.last_read, default=None)
        if reading is not None:  # the prompt that read least recently (a new one first)
            self.prefill_chunks += 1
            reading.last_read = self.prefill_chunks
            self._guard(reading, self._step)

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
        if job.cancelled:  # its client left while it waited
            with self.condition:
                self.cancelled += 1
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

    def _check(self, job: Job) -> None:
        """Retire a job whose client left (its cache goes with it) or that ran past its deadline."""
        if job.cancelled:
            with self.condition:  # counted before it leaves the active jobs, so /health always shows it in one of the two
                self.cancelled += 1
            self._retire(job)
            job.generation = None
        elif time.monotonic() > job.deadline:
            self._retire(job)
            job.generation = None
            job.send("error", timeout_error())

    def _decode(self, jobs: list[Job]) -> None:
        """One token of each job in one batched forward; a failure of that forward fails all of its rows."""
        try:
            pieces = self.engine.decode([job.generation for job in jobs])
        except Exception as err:
            for job in jobs:
                self._retire(job)
                job.send("error", err)
            return
        self.decode_steps += 1
        self.decoded_tokens += len(jobs)
        for job, piece in zip(jobs, pieces):
            self._deliver(job, piece)

    def _step(self, job: Job) -> None:
        piece = job.generation.step()
        if job.progress and job.generation.prefilling:
            job.send("progress", job.generation.cache.seen_tokens)
        self._deliver(job, piece)

    def _deliver(self, job: Job, piece: str) -> None:
        if piece:
            job.send("text", piece)
        if job.generation.done:
            self._retire(job)
            job.send("done", job.generation)
