"""Inference cache: a constant-size GLA state, a rolling window of keys/values, or a growing KV cache per layer.

Parallel layers hold a GLA state and one of the two key/value caches. Softmax caches also
keep the keys and values of the layer's sink tokens, computed once per cache: ``extend``
returns them in front of the real keys, as the attention kernels expect (``num_sinks``).

:class:`RowCaches` puts the caches of several sequences side by side for one batched decode
step: each row keeps its own cache (its own length, window and positions), and the softmax
mixers read and extend it as a one-row forward would; GLA states, all of one shape, are stacked
for the step (:func:`stack_states`) and handed back row by row (:func:`unstack_states`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..ops.attention import Int8Rows, head_major_empty

__all__ = ["GLAState", "WindowKV", "FullKV", "ParallelState", "SpikingBrainCache", "RowCaches", "stack_states", "unstack_states"]


class _LayerCache:
    """Common interface of one layer's cache entry."""

    supports_early_init = False
    is_compileable = False
    is_croppable = False
    is_sliding = False

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that make up this entry (empty before the first forward)."""
        raise NotImplementedError

    def map_tensors(self, fn) -> None:
        """Replace every tensor ``t`` of this entry by ``fn(t)`` (batch reordering, device moves)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes held by this entry."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class GLAState(_LayerCache):
    """Recurrent state ``[B, Hkv, K, V]`` (fp32) of a gated-linear-attention layer."""

    def __init__(self):
        self.state: torch.Tensor | None = None

    def tensors(self):
        return {} if self.state is None else {"state": self.state}

    def map_tensors(self, fn):
        if self.state is not None:
            self.state = fn(self.state)


def stack_states(states: list[GLAState | None], shape: tuple[int, int, int], like: torch.Tensor) -> GLAState:
    """One GLA state ``[rows, Hkv, K, V]`` holding the rows' states (zeros for padding rows and empty states)."""
    stacked = GLAState()
    zeros = torch.zeros(1, *shape, dtype=torch.float32, device=like.device)
    stacked.state = torch.cat([zeros if s is None or s.state is None else s.state for s in states])
    return stacked


def unstack_states(stacked: GLAState, states: list[GLAState | None]) -> None:
    """Give every (non-padding) row its own copy of its row of ``stacked``."""
    for i, state in enumerate(states):
        if state is not None:
            state.state = stacked.state[i : i + 1].clone()


#: A window extended by at most this many positions is kept as a view of the extended keys (no copy).
VIEW_MAX_NEW = 16
#: Slots of the first step buffer of a window cache (it doubles as it fills, up to the whole window).
MIN_STEP_SLOTS = 64


class WindowKV(_LayerCache):
    """The last ``window`` rotated keys and values ``[B, n, Hkv, D]`` of a sliding-window layer.

    Sink keys and values (``[1, num_sinks, Hkv, D]``, shared by the batch) are kept apart from
    the rolling window and never leave it. With ``keep_first`` the first positions of the
    sequence are kept in front of the window too (attention sinks made of real tokens).

    One-token steps whose caller attends to every returned key (``extend(..., ring=True)``) use a
    step buffer: until it is full each step writes its key in the next slot and gets a view of
    the filled part (in order), the buffer doubling when it runs out of room; at its full size
    ``[sinks | first | window + 1 slots]`` it is a ring, where each step writes its key over the
    one leaving the window. So no step copies the window. ``keys`` and ``values`` always read the
    window in order. ``step_dtype`` (``torch.float16``, or ``torch.int8``: codes with one scale per
    position and head, ``ops.attention.Int8Rows``) stores the step buffer so, so that each step reads
    fewer bytes; ``keys`` and ``values`` read it back in the dtype of the keys given (rounded once,
    when a key enters the buffer).
    """

    is_sliding = True

    def __init__(self, window: int, keep_first: int = 0, step_dtype: torch.dtype | None = None):
        self.window = window
        self.keep_first = keep_first
        self.step_dtype = step_dtype
        self._dtype: torch.dtype | None = None  # the dtype of the keys given, which keys and values return
        self._keys: torch.Tensor | None = None  # the window in order (None in ring mode)
        self._values: torch.Tensor | None = None
        self._ring: tuple[torch.Tensor, torch.Tensor] | None = None  # the step buffer
        self._filled = 0  # real positions written into the step buffer (all its slots: a ring)
        self._oldest = 0  # once a ring: the window slot of the key the next step overwrites
        self.sinks: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_sinks(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the sink keys/values ``[1, n, Hkv, D]`` that ``extend`` puts in front of the window."""
        self.sinks = (keys, values)

    @property
    def keys(self) -> torch.Tensor | None:
        """The cached window's keys in order (first kept positions, then the last ``window``)."""
        return self._ordered(0) if self._ring is not None else self._keys

    @keys.setter
    def keys(self, keys: torch.Tensor | None) -> None:
        self._keys, self._ring = keys, None

    @property
    def values(self) -> torch.Tensor | None:
        """The cached window's values, in the order of ``keys``."""
        return self._ordered(1) if self._ring is not None else self._values

    @values.setter
    def values(self, values: torch.Tensor | None) -> None:
        self._values, self._ring = values, None

    def _capacity(self) -> int:
        """Real positions the step buffer holds: the first ones, the window and the step's new key."""
        return self.keep_first + self.window + 1

    def _ordered(self, which: int) -> torch.Tensor:
        buffer, start = self._ring[which], self._num_sinks()
        if self._filled < self._capacity():
            return buffer[:, start : start + self._filled].to(self._dtype)
        ring = buffer[:, start + self.keep_first :]
        pieces = (buffer[:, start : start + self.keep_first], ring[:, self._oldest + 1 :], ring[:, : self._oldest])
        return torch.cat([piece.to(self._dtype) for piece in pieces], 1)

    def _num_sinks(self) -> int:
        return 0 if self.sinks is None else self.sinks[0].shape[1]

    def _batch_sinks(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The sink keys and values expanded to ``batch`` rows, as a list of zero or one pair."""
        return [] if self.sinks is None else [tuple(t.expand(batch, *t.shape[1:]) for t in self.sinks)]

    def extend(self, keys: torch.Tensor, values: torch.Tensor, ring: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Return sinks + cached + new keys/values and keep only the last ``window`` real ones.

        ``ring``: the caller attends to every returned key without a padding mask, so a one-token
        step with a full window may return the ring buffer (keys out of order, see the class).
        After other decode steps (a few new positions, no kept first tokens) the window is kept as
        a view of the returned tensors instead of a copy: they are only a few positions longer.
        """
        new = keys.shape[1]
        if ring and new == 1:
            return self._ring_step(keys, values)
        front = self._batch_sinks(keys.shape[0]) + ([(self.keys, self.values)] if self.length else [])
        if front:
            keys = torch.cat([k for k, _ in front] + [keys], 1)
            values = torch.cat([v for _, v in front] + [values], 1)
        n = self._num_sinks()
        first, real = self.keep_first, keys.shape[1] - n
        if real > first + self.window and not first and new <= VIEW_MAX_NEW:
            self.keys, self.values = (t[:, t.shape[1] - self.window :] for t in (keys, values))
        elif real > first + self.window:  # drop what lies between the first positions and the window
            self.keys, self.values = (torch.cat((t[:, n : n + first], t[:, t.shape[1] - self.window :]), 1) for t in (keys, values))
        else:
            self.keys, self.values = keys[:, n:].contiguous(), values[:, n:].contiguous()
        return keys, values

    def _ring_step(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self._num_sinks()
        if self._ring is None or (self._filled < self._capacity() and n + self._filled == self._ring[0].shape[1]):
            self._grow(keys, values)
        if self._filled < self._capacity():  # still filling: the next slot, and a view of the filled part
            slot = n + self._filled
            self._filled += 1
            self._write(slot, keys, values)
            return tuple(t[:, : slot + 1] for t in self._ring)
        slot = n + self.keep_first + self._oldest  # a ring: overwrite the key leaving the window
        self._write(slot, keys, values)
        self._oldest = (self._oldest + 1) % (self.window + 1)
        return self._ring

    def _write(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The step's key and value ``[B, 1, Hkv, D]`` into ring position ``slot``."""
        for buffer, rows in zip(self._ring, (keys, values)):
            if isinstance(buffer, Int8Rows):
                buffer.set_position(slot, rows[:, 0])
            else:
                buffer[:, slot] = rows[:, 0]

    def _grow(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """(Re)allocate the step buffer with room for more positions: twice the filled part (at least
        ``MIN_STEP_SLOTS``), at most ``[sinks | first | window + 1]``, so that the copies of a growing
        window cost O(1) per step; the sinks and the cached positions go in front, in order."""
        n = self._num_sinks()
        if self._ring is None:
            length, cached = self.length, (self._keys, self._values)
            sinks = self._batch_sinks(keys.shape[0])
            front = sinks[0] if sinks else None
        else:
            length, cached = self._filled, tuple(t[:, n : n + self._filled] for t in self._ring)
            front = tuple(t[:, :n] for t in self._ring) if n else None
        slots = min(self._capacity(), max(MIN_STEP_SLOTS, 2 * length))
        self._dtype = keys.dtype
        buffers = tuple(self._step_buffer(t, n + slots) for t in (keys, values))
        for i, buffer in enumerate(buffers):
            if front is not None:
                buffer[:, :n] = front[i]
            if length:
                buffer[:, n : n + length] = cached[i]
        self._ring, self._keys, self._values = buffers, None, None
        self._filled, self._oldest = length, 0

    def _step_buffer(self, like: torch.Tensor, positions: int):
        """An uninitialised head-major step buffer of ``positions`` rows like ``like``, in ``step_dtype`` (int8: codes
        with their scales, ``Int8Rows``)."""
        if self.step_dtype == torch.int8:
            return Int8Rows.empty(like, positions)
        return head_major_empty(like, positions, self.step_dtype)

    @property
    def length(self) -> int:
        """Number of cached real positions."""
        if self._ring is not None:
            return min(self._filled, self.keep_first + self.window)
        return 0 if self._keys is None else self._keys.shape[1]

    def tensors(self):
        return {} if self.length == 0 else {"keys": self.keys, "values": self.values}

    def map_tensors(self, fn):
        if self.length:
            keys, values = self.keys, self.values
            self.keys, self.values = fn(keys), fn(values)

    def nbytes(self) -> int:
        if self._ring is not None:  # the buffer holds a copy of the sinks
            return sum(t.nbytes for t in self._ring)
        sinks = 0 if self.sinks is None else sum(t.numel() * t.element_size() for t in self.sinks)
        return super().nbytes() + sinks


class FullKV(_LayerCache):
    """All rotated keys and values ``[B, T, Hkv, D]`` of a full-attention layer (amortised growth).

    Sink keys and values are stored in the first slots of the buffer, so that decoding reads
    them without a copy.
    """

    def __init__(self):
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self.length = 0
        self.sinks: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_sinks(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the sink keys/values ``[1, n, Hkv, D]``; the first ``extend`` writes them before the real keys."""
        if self.length:
            raise RuntimeError("sinks must be set before the first keys of a full-attention cache")
        self.sinks = (keys, values)

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values and return all of them (sinks first)."""
        if self.sinks is not None and not self.length:
            keys, values = (torch.cat((s.expand(keys.shape[0], *s.shape[1:]), t), 1) for s, t in zip(self.sinks, (keys, values)))
        needed = self.length + keys.shape[1]
        if self._keys is None or needed > self._keys.shape[1]:
            capacity = max(needed, 2 * (0 if self._keys is None else self._keys.shape[1]))
            new_k, new_v = head_major_empty(keys, capacity), head_major_empty(values, capacity)
            if self.length:
                new_k[:, : self.length] = self._keys[:, : self.length]
                new_v[:, : self.length] = self._values[:, : self.length]
            self._keys, self._values = new_k, new_v
        self._keys[:, self.length : needed] = keys
        self._values[:, self.length : needed] = values
        self.length = needed
        return self._keys[:, :needed], self._values[:, :needed]

    def tensors(self):
        if self._keys is None:
            return {}
        return {"keys": self._keys[:, : self.length], "values": self._values[:, : self.length]}

    def map_tensors(self, fn):
        if self._keys is not None:
            self._keys, self._values = fn(self._keys[:, : self.length]), fn(self._values[:, : self.length])


class ParallelState(_LayerCache):
    """Cache of a parallel layer: the GLA state of its linear branch and the keys/values of its softmax branch."""

    def __init__(self, softmax: WindowKV | FullKV):
        self.linear = GLAState()
        self.softmax = softmax
        self.is_sliding = softmax.is_sliding

    def tensors(self):
        parts = {"linear": self.linear.tensors(), "softmax": self.softmax.tensors()}
        return {f"{branch}.{name}": t for branch, tensors in parts.items() for name, t in tensors.items()}

    def map_tensors(self, fn):
        self.linear.map_tensors(fn)
        self.softmax.map_tensors(fn)

    def nbytes(self) -> int:
        return self.linear.nbytes() + self.softmax.nbytes()


def _layer_cache(mixer: str, window: int, keep_first: int, step_dtype: torch.dtype | None = None) -> _LayerCache:
    if mixer == "gla":
        return GLAState()
    if mixer == "swa":
        return WindowKV(window, keep_first, step_dtype)
    if mixer == "full":
        return FullKV()
    if mixer.startswith("parallel-"):
        return ParallelState(_layer_cache(mixer.removeprefix("parallel-"), window, keep_first, step_dtype))
    raise ValueError(f"no cache for mixer {mixer!r}")


class SpikingBrainCache(Cache):
    """Per-layer inference state of a SpikingBrain model, usable with ``generate()``.

    GLA and sliding-window layers hold a constant amount of memory whatever the sequence
    length; full-attention layers grow with it. ``seen_tokens`` counts processed positions.
    """

    def __init__(self, layer_mixers: list[str], window: int, keep_first: int = 0, window_step_dtype: torch.dtype | None = None):
        super().__init__(layers=[_layer_cache(m, window, keep_first, window_step_dtype) for m in layer_mixers])
        self.layer_mixers = list(layer_mixers)
        self.window = window
        self.keep_first = keep_first
        self.seen_tokens = 0

    @classmethod
    def for_config(cls, config) -> "SpikingBrainCache":
        """An empty cache shaped for ``config``."""
        step_dtype = getattr(torch, config.window_kv_dtype) if config.window_kv_dtype else None
        return cls(config.layer_mixers, config.attention_window, config.keep_first_tokens, step_dtype)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            for t in layer.tensors().values():
                return t.shape[0]
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a GLA state cannot be rolled back; snapshot the cache instead of cropping it")

    def reset(self) -> None:
        self.layers = [_layer_cache(m, self.window, self.keep_first) for m in self.layer_mixers]
        self.seen_tokens = 0

    def _map(self, fn) -> None:
        for layer in self.layers:
            layer.map_tensors(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def nbytes(self) -> int:
        """Total bytes held by the cache."""
        return sum(layer.nbytes() for layer in self.layers)

    def __repr__(self) -> str:
        return f"SpikingBrainCache(seen_tokens={self.seen_tokens}, layers={self.layer_mixers}, bytes={self.nbytes()})"


class RowCaches:
    """One layer's cache entries of the rows of a batched decode step, row by row (None: a padding row without state).

    ``of_layer`` builds it from whole-model caches; a parallel layer reads its two branches
    through ``linear`` and ``softmax``.
    """

    def __init__(self, entries: list[_LayerCache | None]):
        self.entries = list(entries)

    @classmethod
    def of_layer(cls, caches: list[SpikingBrainCache | None], layer_idx: int) -> "RowCaches":
        """The entries of layer ``layer_idx`` of every row's cache."""
        return cls([None if c is None else c.layers[layer_idx] for c in caches])

    @property
    def linear(self) -> "RowCaches":
        """The GLA states of a parallel layer's rows."""
        return RowCaches([None if e is None else e.linear for e in self.entries])

    @property
    def softmax(self) -> "RowCaches":
        """The key/value caches of a parallel layer's rows."""
        return RowCaches([None if e is None else e.softmax for e in self.entries])
