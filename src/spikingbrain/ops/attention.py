"""Causal softmax attention: full (through SDPA) and sliding-window (block-wise, O(T*W)).

Shapes: ``q`` is ``[B, Tq, H, D]``, ``k`` and ``v`` are ``[B, Tk, Hkv, D]`` with
``Tk >= Tq`` and ``H % Hkv == 0`` (grouped-query attention). The queries are the *last*
``Tq`` positions of the key sequence: query ``i`` sits at key position ``Tk - Tq + i``, so
a cached prefix is passed by prepending its keys and values. ``key_padding_mask``
(``[B, Tk]``, true = real token) hides padded keys; a padded query still sees itself so
that no row is empty (its output is meaningless but finite).

``num_sinks``: the first ``num_sinks`` keys and values are sink tokens that every query
sees; they take no part in the causal order or the window, and ``Tk`` and
``key_padding_mask`` count only the keys after them.

Keys and values may be stored in another float dtype than ``q`` (a window cache's fp16 decode ring);
they are read as ``q``'s dtype.

``keep_first`` (sliding window only): the first ``keep_first`` real keys stay visible to
every later query once the window has passed them (StreamingLLM's attention sinks). They
are ordinary positions of the sequence, subject to causality and padding.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch
import torch.nn.functional as F

from .native import load_kernel
from .threads import kernel_threads

__all__ = ["causal_attention", "sliding_window_attention", "decode_attention_available", "Int8Rows", "head_major_empty"]


def head_major_empty(like: torch.Tensor, positions: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised ``[B, positions, Hkv, D]`` buffer like ``like``, stored head-major (``[B, Hkv, positions, D]``
    in memory), so that attention over it reads each head's keys contiguously (one decode query over 4k keys
    through SDPA took a third of the time of the position-major layout); in ``dtype`` (None: ``like``'s)."""
    batch, _, heads, dim = like.shape
    return like.new_empty(batch, heads, positions, dim, dtype=dtype).transpose(1, 2)


class Int8Rows:
    """Keys or values ``[B, T, Hkv, D]`` stored as int8 codes with one fp32 scale per position and head (``scales``
    ``[B, T, Hkv]``): each row is ``codes * scale``, its scale its largest magnitude / 127.

    Indexing with slices over the first dimensions views both parts; assigning float rows quantizes them;
    ``to(dtype)`` gives the rows as floats. A window cache keeps its decode ring so (``window_kv_dtype: int8``).
    """

    dtype = torch.int8

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        self.codes, self.scales = codes, scales

    @classmethod
    def empty(cls, like: torch.Tensor, positions: int) -> "Int8Rows":
        """Uninitialised rows for ``positions`` positions of ``like`` ``[B, T, Hkv, D]``, stored head-major (each head's
        positions contiguous, codes and scales alike)."""
        batch, _, heads, _ = like.shape
        scales = like.new_empty(batch, heads, positions, dtype=torch.float32).transpose(1, 2)
        return cls(head_major_empty(like, positions, torch.int8), scales)

    @classmethod
    def quantized(cls, rows: torch.Tensor) -> "Int8Rows":
        """``rows`` ``[B, T, Hkv, D]`` as int8 rows, stored head-major."""
        stored = cls.empty(rows, rows.shape[1])
        stored[:] = rows
        return stored

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dim(self) -> int:
        return self.codes.dim()

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def __getitem__(self, index) -> "Int8Rows":
        return Int8Rows(self.codes[index], self.scales[index])

    def __setitem__(self, index, rows) -> None:
        if isinstance(rows, Int8Rows):
            self.codes[index], self.scales[index] = rows.codes, rows.scales
            return
        rows = rows.detach().float()
        scales = rows.abs().amax(-1).clamp_min_(torch.finfo(torch.float32).tiny).div_(127)
        self.codes[index] = rows.div(scales.unsqueeze(-1)).round_().clamp_(-127, 127)  # whole numbers: cast exactly
        self.scales[index] = scales

    def set_position(self, position: int, rows: torch.Tensor) -> None:
        """``self[:, position] = rows`` for rows ``[B, Hkv, D]`` (a decode step's new key or value): one kernel call
        where the decode-attention kernel runs (the same codes and scales), else the indexing above."""
        lib = _attention_library()
        codes, scales = self.codes[:, position], self.scales[:, position]
        if lib is None or rows.dtype != torch.float32 or rows.device.type != "cpu" or rows.stride(-1) != 1 or codes.stride(-1) != 1 \
                or rows.shape != codes.shape:  # (the indexed write detaches the rows too)
            self[:, position] = rows
            return
        lib.sb_quantize_rows(rows.data_ptr(), *rows.shape, rows.stride(0), rows.stride(1),
                             codes.data_ptr(), codes.stride(0), codes.stride(1), scales.data_ptr(), *scales.stride())

    def to(self, dtype: torch.dtype) -> torch.Tensor:
        """The rows as ``dtype`` floats."""
        return (self.codes.to(torch.float32) * self.scales.unsqueeze(-1)).to(dtype)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask, num_sinks: int = 0) -> tuple[int, ...]:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q [B, Tq, H, D] and k, v [B, Tk, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1] - num_sinks, k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or H % Hkv or Tk < Tq:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)}: need same B and D, H % Hkv == 0, Tk >= Tq")
    if key_padding_mask is not None and key_padding_mask.shape != (B, Tk):
        raise ValueError(f"key_padding_mask must be [B, Tk] = {(B, Tk)}, got {tuple(key_padding_mask.shape)}")
    return B, Tq, H, Hkv, D, Tk


def causal_attention(q, k, v, scale=None, key_padding_mask=None, num_sinks: int = 0):
    """Full causal attention through ``scaled_dot_product_attention``."""
    B, Tq, H, Hkv, D, Tk = _check(q, k, v, key_padding_mask, num_sinks)
    scale = D**-0.5 if scale is None else scale
    if key_padding_mask is None and Tq == 1 and _kernel_applies(q, k, v):  # a decode step on CPU
        return _kernel_attention(q, k, v, scale)
    k, v = k.to(q.dtype), v.to(q.dtype)  # keys and values kept in another dtype (a decode ring in fp16) compute in q's
    if key_padding_mask is None and (Tq == 1 or (Tq == Tk and not num_sinks)):  # one query (decoding) sees every key
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=Tq > 1, scale=scale, enable_gqa=Hkv != H)
        return o.transpose(1, 2)
    return _dense_masked_attention(q, k, v, None, scale, key_padding_mask, num_sinks, 0)


_P, _I = ctypes.c_void_p, ctypes.c_int64
#: The kernel's codes for how keys and values are stored.
_KV_KINDS = {torch.float32: 0, torch.float16: 1, torch.int8: 2}


@functools.cache
def _attention_library() -> ctypes.CDLL | None:
    """The built decode-attention kernel (``kernels/decode_attention.c``) where this CPU has AVX-512, else None."""
    lib = load_kernel("decode_attention")
    if lib is None or not lib.sb_attention_supported():
        return None
    lib.sb_attend.argtypes = [_P, _I, _I, _I, _I, _I, _P, _I, _I, _I, _P, _I, _I, _I, ctypes.c_int,
                              _P, _I, _I, _I, _P, _I, _I, _I, ctypes.c_float, _P, ctypes.c_int]
    lib.sb_attend.restype = ctypes.c_int
    lib.sb_quantize_rows.argtypes = [_P, _I, _I, _I, _I, _I, _P, _I, _I, _P, _I, _I]
    lib.sb_quantize_rows.restype = None
    return lib


def _parts(rows: torch.Tensor | Int8Rows) -> tuple:
    """The kernel's arguments for keys or values: data pointer and strides, then the scales' pointer and strides."""
    if isinstance(rows, Int8Rows):
        codes, scales = rows.codes, rows.scales
        return (codes.data_ptr(), codes.stride(0), codes.stride(1), codes.stride(2)), (scales.data_ptr(), *scales.stride())
    return (rows.data_ptr(), rows.stride(0), rows.stride(1), rows.stride(2)), (None, 0, 0, 0)


def _kernel_attention(q: torch.Tensor, k, v, scale: float) -> torch.Tensor:
    """One query ``q [B, 1, H, D]`` over every key of ``k, v [B, Tk, Hkv, D]`` (any order; fp32, fp16 or ``Int8Rows``)
    through the C kernel."""
    B, _, H, D = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    (k_data, k_scales), (v_data, v_scales) = _parts(k), _parts(v)
    failed = _attention_library().sb_attend(
        q.data_ptr(), B, H, k.shape[2], D, k.shape[1], *k_data, *v_data, _KV_KINDS[k.dtype], *k_scales, *v_scales,
        scale, out.data_ptr(), kernel_threads(),
    )
    if failed:
        raise MemoryError(f"the decode-attention kernel could not allocate {H * k.shape[1] * 4} bytes of scores")
    return out


def _kernel_applies(q: torch.Tensor, k, v) -> bool:
    """Whether the decode-attention kernel takes these tensors: on CPU, an fp32 query, fp32, fp16 or ``Int8Rows`` keys
    and values, each key's values contiguous, no gradient."""
    if isinstance(k, Int8Rows) != isinstance(v, Int8Rows):
        return False
    if isinstance(k, Int8Rows):
        k, v = k.codes, v.codes
    return (q.device.type == "cpu" and q.dtype == torch.float32 and k.dtype == v.dtype and k.dtype in _KV_KINDS
            and k.stride(3) == 1 and v.stride(3) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and decode_attention_available())


@functools.cache
def decode_attention_available() -> bool:
    """Whether the decode-attention kernel runs here and matches a hand-computed softmax (two keys, two query heads of
    one key/value head, values of 4 features)."""
    if _attention_library() is None:
        return False
    q = torch.tensor([[[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])  # [1, 1, 2, 4]
    k = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]], [[0.0, 1.0, 0.0, 0.0]]]])  # [1, 2, 1, 4]
    v = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]], [[-1.0, 0.0, 1.0, 2.0]]]])
    w = math.e / (math.e + 1)  # the first head weighs its keys e : 1, the second 1 : 1
    expected = torch.tensor([[[[2 * w - 1, 2 * w, 2 * w + 1, 2 * w + 2], [0.0, 1.0, 2.0, 3.0]]]])
    return torch.allclose(_kernel_attention(q, k, v, 1.0), expected, rtol=1e-6, atol=1e-6)


def _prepend_sinks(windows: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Key windows ``[B, Hkv, Nb, Lk, D]`` with the sink keys ``[B, n, Hkv, D]`` in front of every block."""
    B, Hkv, Nb, _, D = windows.shape
    sinks = sinks.transpose(1, 2).unsqueeze(2).expand(B, Hkv, Nb, sinks.shape[1], D)
    return torch.cat((sinks, windows), dim=3)


def sliding_window_attention(
    q, k, v, window: int, scale=None, key_padding_mask=None, block_size: int = 256, num_sinks: int = 0,
    keep_first: int = 0,
):
    """Causal attention where the query at position ``p`` sees keys ``p - window .. p`` (and the sinks,
    and the first ``keep_first`` keys).

    ``window`` follows flash-attn's ``window_size=(window, 0)``: ``window + 1`` keys
    including the query's own. Queries are processed in blocks of ``block_size``; each
    block reads only its ``block_size + window`` keys, so cost is O(Tq * (window + block)).
    Without a padding mask, queries at positions ``< window`` (nothing cut off yet) run as
    plain causal attention and the rest as blocks that need one band mask shared by all
    blocks, batch rows and heads. Sink keys are copied in front of every block's window.
    """
    B, Tq, H, Hkv, D, Tk = _check(q, k, v, key_padding_mask, num_sinks)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if keep_first < 0:
        raise ValueError(f"keep_first must be >= 0, got {keep_first}")
    if Tk <= window + 1 or (Tq == 1 and key_padding_mask is None and Tk <= window + 1 + keep_first):
        return causal_attention(q, k, v, scale, key_padding_mask, num_sinks)  # the window cuts nothing off
    scale = D**-0.5 if scale is None else scale
    k, v = k.to(q.dtype), v.to(q.dtype)
    keep_first = min(keep_first, Tk)
    if key_padding_mask is not None:
        if keep_first:
            return _dense_masked_attention(q, k, v, window, scale, key_padding_mask, num_sinks, keep_first)
        return _sliding_window_masked(q, k, v, window, scale, key_padding_mask, block_size, num_sinks)
    offset = Tk - Tq
    # Queries at key positions p < window + keep_first see every earlier key: those before p - window are all among
    # the first keep_first, so their attention is plain causal attention (SDPA skips the masked half).
    n_near = min(Tq, max(0, window + keep_first - offset))
    parts = []
    if n_near:
        end = num_sinks + offset + n_near
        parts.append(causal_attention(q[:, :n_near], k[:, :end], v[:, :end], scale, num_sinks=num_sinks))
    if n_near < Tq:
        if keep_first:  # every later window has passed the first keys: they join the sinks
            k, v = (torch.cat((x[:, : num_sinks + keep_first], x[:, num_sinks:]), 1) for x in (k, v))
        parts.append(
            _banded_attention(q[:, n_near:], k, v, window, scale, offset + n_near, block_size, num_sinks + keep_first)
        )
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _dense_masked_attention(q, k, v, window: int | None, scale: float, key_padding_mask, num_sinks: int, keep_first: int):
    """Causal attention through one dense mask: over all keys (``window=None``) or a sliding window with the
    first ``keep_first`` real keys always visible (with a padding mask: the first real keys of each row).

    For cached or padded full attention, the few window queries near the start of a sequence and
    padded window batches with kept keys.
    """
    B, Tq, H, Hkv, D, Tk = _check(q, k, v, key_padding_mask, num_sinks)
    q_pos = torch.arange(Tk - Tq, Tk, device=q.device).unsqueeze(1)
    k_pos = torch.arange(Tk, device=q.device).unsqueeze(0)
    causal = k_pos <= q_pos
    in_window = q_pos - k_pos <= window if window is not None else torch.ones_like(causal)
    if key_padding_mask is None:
        mask = (causal & (in_window | (k_pos < keep_first))).unsqueeze(0)
    else:
        real = key_padding_mask.bool()
        first = real & (real.long().cumsum(1) <= keep_first)  # [B, Tk]
        mask = causal & (in_window.unsqueeze(0) | first.unsqueeze(1))
        mask = mask & (real.unsqueeze(1) | (k_pos == q_pos))  # a padded query still sees itself
    if num_sinks:
        mask = F.pad(mask, (num_sinks, 0), value=True)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=Hkv != H)
    return o.transpose(1, 2)


def _band(block: int, groups: int, keys: int, window: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Band ``[groups*block, keys]`` (row ``r`` = query ``i = r % block`` of a block sees columns
    ``i .. i + window``) and the diagonal (column ``i + window``: the query's own key)."""
    row = torch.arange(groups * block, device=device).remainder(block).unsqueeze(1)
    col = torch.arange(keys, device=device).unsqueeze(0)
    return (col >= row) & (col <= row + window), col == row + window


def _stack_query_blocks(q: torch.Tensor, Hkv: int, Bq: int, Nb: int) -> torch.Tensor:
    """``[B, Tq, H, D]`` -> ``[B, Hkv, Nb, G*Bq, D]``: query heads of one key/value head stacked on rows."""
    B, Tq, H, D = q.shape
    q = F.pad(q, (0, 0, 0, 0, 0, Nb * Bq - Tq)).view(B, Nb, Bq, Hkv, H // Hkv, D)
    return q.permute(0, 3, 1, 4, 2, 5).reshape(B, Hkv, Nb, H // Hkv * Bq, D)


def _unstack_query_blocks(o: torch.Tensor, B: int, Tq: int, H: int, Hkv: int, Bq: int, Nb: int) -> torch.Tensor:
    """Inverse of :func:`_stack_query_blocks` (any leading layout of ``B*Hkv*Nb`` rows)."""
    D = o.shape[-1]
    o = o.reshape(B, Hkv, Nb, H // Hkv, Bq, D).permute(0, 2, 4, 1, 3, 5).reshape(B, Nb * Bq, H, D)
    return o[:, :Tq]


def _banded_attention(
    q, k, v, window: int, scale: float, start: int, block_size: int, num_sinks: int = 0
) -> torch.Tensor:
    """Sliding-window attention of queries at key positions ``start .. start + Tq - 1``, ``start >= window``.

    Every query's window lies inside the keys, so blocks need no front padding: block ``n``
    reads keys ``[start + n*Bq - window, start + (n+1)*Bq)`` as a strided view (no copy
    unless sinks are prepended), the query heads of one key/value head are stacked along the
    rows, and a single ``[G*Bq, Bq + window]`` band mask serves every block, batch row and head.
    """
    B, Tq, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    Bq = min(block_size, Tq)
    Nb = math.ceil(Tq / Bq)
    Lk = Bq + window
    tail = Nb * Bq - Tq

    def key_windows(x: torch.Tensor) -> torch.Tensor:
        sinks, x = x[:, :num_sinks], x[:, num_sinks + start - window :].transpose(1, 2)  # [B, Hkv, window + Tq, D]
        x = F.pad(x, (0, 0, 0, tail)).contiguous()
        L = x.shape[2]
        windows = x.as_strided((B, Hkv, Nb, Lk, D), (Hkv * L * D, L * D, Bq * D, D, 1))
        if num_sinks:
            windows = _prepend_sinks(windows, sinks)
        return windows.reshape(B * Hkv, Nb, num_sinks + Lk, D)

    kw, vw = key_windows(k), key_windows(v)
    qw = _stack_query_blocks(q, Hkv, Bq, Nb).reshape(B * Hkv, Nb, G * Bq, D)
    band, _ = _band(Bq, G, Lk, window, q.device)
    mask = torch.zeros(band.shape, dtype=q.dtype, device=q.device).masked_fill(~band, float("-inf"))
    if num_sinks:  # sinks: always visible
        mask = F.pad(mask, (num_sinks, 0))
    o = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask, scale=scale)  # [B*Hkv, Nb, G*Bq, D]
    return _unstack_query_blocks(o, B, Tq, H, Hkv, Bq, Nb)


def _sliding_window_masked(
    q, k, v, window: int, scale: float, key_padding_mask, block_size: int, num_sinks: int = 0
) -> torch.Tensor:
    """Sliding-window attention with a key padding mask (a mask per batch row and query block)."""
    B, Tq, H, Hkv, D, Tk = _check(q, k, v, key_padding_mask, num_sinks)
    G, offset = H // Hkv, Tk - Tq
    Bq = min(block_size, Tq)
    Nb = math.ceil(Tq / Bq)
    Lk = Bq + window
    tail = Nb * Bq - Tq

    # Keys padded with `window` slots in front (positions < 0) and `tail` at the end;
    # block n reads padded slots [offset + n*Bq, offset + n*Bq + Lk).
    def key_windows(x: torch.Tensor) -> torch.Tensor:
        sinks, x = x[:, :num_sinks], F.pad(x[:, num_sinks:].transpose(1, 2), (0, 0, window, tail)).contiguous()
        s = x.stride()
        w = x.as_strided((B, Hkv, Nb, Lk, D), (s[0], s[1], Bq * s[2], s[2], s[3]), offset * s[2])
        if num_sinks:
            w = _prepend_sinks(w, sinks)
        return w.reshape(B * Hkv * Nb, 1, num_sinks + Lk, D)

    kw, vw = key_windows(k), key_windows(v)
    qw = _stack_query_blocks(q, Hkv, Bq, Nb).reshape(B * Hkv * Nb, 1, G * Bq, D)
    band, diagonal = _band(Bq, G, Lk, window, q.device)  # [G*Bq, Lk]
    valid = torch.zeros(B, window + Tk + tail, dtype=torch.bool, device=q.device)
    valid[:, window : window + Tk] = key_padding_mask.bool()
    vs = valid.stride()
    valid_w = valid.as_strided((B, Nb, Lk), (vs[0], Bq * vs[1], vs[1]), offset * vs[1])
    mask = band & (valid_w.unsqueeze(2) | diagonal)  # [B, Nb, G*Bq, Lk]
    if num_sinks:  # sinks: always visible
        mask = F.pad(mask, (num_sinks, 0), value=True)
    mask = mask.unsqueeze(1).expand(B, Hkv, Nb, G * Bq, num_sinks + Lk).reshape(-1, 1, G * Bq, num_sinks + Lk)
    o = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask, scale=scale)
    return _unstack_query_blocks(o, B, Tq, H, Hkv, Bq, Nb)
