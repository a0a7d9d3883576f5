"""Causal softmax attention: full (through SDPA) and sliding-window (block-wise, O(T*W)).

Shapes: ``q`` is ``[B, Tq, H, D]``, ``k`` and ``v`` are ``[B, Tk, Hkv, D]`` with
``Tk >= Tq`` and ``H % Hkv == 0`` (grouped-query attention). The queries are the *last*
``Tq`` positions of the key sequence: query ``i`` sits at key position ``Tk - Tq + i``, so
a cached prefix is passed by prepending its keys and values. ``key_padding_mask``
(``[B, Tk]``, true = real token) hides padded keys; a padded query still sees itself so
that no row is empty (its output is meaningless but finite).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["causal_attention", "sliding_window_attention"]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask) -> tuple[int, ...]:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q [B, Tq, H, D] and k, v [B, Tk, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or H % Hkv or Tk < Tq:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)}: need same B and D, H % Hkv == 0, Tk >= Tq")
    if key_padding_mask is not None and key_padding_mask.shape != (B, Tk):
        raise ValueError(f"key_padding_mask must be [B, Tk] = {(B, Tk)}, got {tuple(key_padding_mask.shape)}")
    return B, Tq, H, Hkv, D, Tk


def causal_attention(q, k, v, scale=None, key_padding_mask=None):
    """Full causal attention through ``scaled_dot_product_attention``."""
    B, Tq, H, Hkv, D, Tk = _check(q, k, v, key_padding_mask)
    scale = D**-0.5 if scale is None else scale
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if Tq == Tk and key_padding_mask is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=Hkv != H)
    else:
        q_pos = torch.arange(Tk - Tq, Tk, device=q.device).unsqueeze(1)
        k_pos = torch.arange(Tk, device=q.device).unsqueeze(0)
        mask = (k_pos <= q_pos).unsqueeze(0)
        if key_padding_mask is not None:
            mask = mask & (key_padding_mask.bool().unsqueeze(1) | (k_pos == q_pos))
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=Hkv != H)
    return o.transpose(1, 2)


def _blocks(x: torch.Tensor, B: int, Hkv: int, Nb: int, which: slice) -> torch.Tensor:
    """Select blocks ``which`` of a ``[B*Hkv*Nb, 1, L, D]`` tensor, keeping that layout."""
    return x.view(B, Hkv, Nb, *x.shape[1:])[:, :, which].reshape(-1, *x.shape[1:])


def sliding_window_attention(q, k, v, window: int, scale=None, key_padding_mask=None, block_size: int = 256):
    """Causal attention where the query at position ``p`` sees keys ``p - window .. p``.

    ``window`` follows flash-attn's ``window_size=(window, 0)``: ``window + 1`` keys
    including the query's own. Queries are processed in blocks of ``block_size``; each
    block reads only its ``block_size + window`` keys, so cost is O(Tq * (window + block)).
    """
    B, Tq, H, Hkv, D, Tk = _check(q, k, v, key_padding_mask)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if Tk <= window + 1:  # the window never cuts anything off
        return causal_attention(q, k, v, scale, key_padding_mask)
    scale = D**-0.5 if scale is None else scale
    G, offset = H // Hkv, Tk - Tq
    Bq = min(block_size, Tq)
    Nb = math.ceil(Tq / Bq)
    Lk = Bq + window
    tail = Nb * Bq - Tq

    # Keys padded with `window` slots in front (positions < 0) and `tail` at the end;
    # block n reads padded slots [offset + n*Bq, offset + n*Bq + Lk).
    def key_windows(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.transpose(1, 2), (0, 0, window, tail)).contiguous()  # [B, Hkv, L, D]
        s = x.stride()
        w = x.as_strided((B, Hkv, Nb, Lk, D), (s[0], s[1], Bq * s[2], s[2], s[3]), offset * s[2])
        return w.reshape(B * Hkv * Nb, 1, Lk, D)

    kw, vw = key_windows(k), key_windows(v)
    qp = F.pad(q, (0, 0, 0, 0, 0, tail)).view(B, Nb, Bq, Hkv, G, D)
    qw = qp.permute(0, 3, 1, 4, 2, 5).reshape(B * Hkv * Nb, 1, G * Bq, D)

    row = torch.arange(Bq, device=q.device).repeat(G).unsqueeze(1)  # query index inside its block
    col = torch.arange(Lk, device=q.device).unsqueeze(0)
    band = (col >= row) & (col <= row + window)  # [G*Bq, Lk]
    if key_padding_mask is None:
        # Only the first blocks can see front padding; the band already hides the tail.
        n_head = min(Nb, math.ceil(max(0, window - offset) / Bq))
    else:
        n_head = Nb
    o = torch.empty(B, Hkv, Nb, G * Bq, D, dtype=q.dtype, device=q.device)
    if n_head:
        valid = torch.zeros(B, window + Tk + tail, dtype=torch.bool, device=q.device)
        valid[:, window : window + Tk] = True if key_padding_mask is None else key_padding_mask.bool()
        vs = valid.stride()
        valid_w = valid.as_strided((B, n_head, Lk), (vs[0], Bq * vs[1], vs[1]), offset * vs[1])
        diagonal = col == row + window
        mask = band & (valid_w.unsqueeze(2) | diagonal)  # [B, n_head, G*Bq, Lk]
        mask = mask.unsqueeze(1).expand(B, Hkv, n_head, G * Bq, Lk).reshape(-1, 1, G * Bq, Lk)
        part = [_blocks(x, B, Hkv, Nb, slice(0, n_head)) for x in (qw, kw, vw)]
        o[:, :, :n_head] = F.scaled_dot_product_attention(*part, attn_mask=mask, scale=scale).view(
            B, Hkv, n_head, G * Bq, D
        )
    if n_head < Nb:
        part = [_blocks(x, B, Hkv, Nb, slice(n_head, Nb)) for x in (qw, kw, vw)]
        o[:, :, n_head:] = F.scaled_dot_product_attention(*part, attn_mask=band, scale=scale).view(
            B, Hkv, Nb - n_head, G * Bq, D
        )
    o = o.view(B, Hkv, Nb, G, Bq, D).permute(0, 2, 4, 1, 3, 5).reshape(B, Nb * Bq, H, D)
    return o[:, :Tq]
