"""Gated linear attention (GLA) kernels in plain PyTorch, and its recurrence as a C kernel for CPU prefills.

Conventions follow flash-linear-attention: sequence-first tensors, log-space gates,
functions return ``(o, final_state)``.

Shapes: ``q`` is ``[B, T, H, K]``; ``k`` and ``g`` are ``[B, T, Hkv, K]``; ``v`` is
``[B, T, Hkv, V]`` with ``H % Hkv == 0`` (grouped heads: query head ``h`` reads key/value
head ``h // (H // Hkv)``). ``g`` is the log of the per-key-channel decay (``g <= 0``).
The recurrence for every key/value head is

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

so the state is ``[B, Hkv, K, V]``: query heads of one group share it, which is exactly
what repeating k, v and g over the group (as the SpikingBrain release does) computes,
with ``H / Hkv`` times less state. States are always fp32.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .native import load_kernel
from .threads import kernel_threads

__all__ = ["naive_gla", "chunk_gla", "recurrent_gla", "kernel_gla", "gla_kernel_applies", "prefill_gla", "gla_kernel"]


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> tuple[int, ...]:
    """Validate GLA input shapes and return ``(B, T, H, Hkv, K, V)``."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or g.dim() != 4:
        raise ValueError("GLA inputs must be 4-D [batch, time, heads, dim]")
    B, T, H, K = q.shape
    Hkv = k.shape[2]
    if k.shape != (B, T, Hkv, K) or g.shape != k.shape:
        raise ValueError(f"k and g must be [B, T, Hkv, K] = {(B, T, Hkv, K)}, got k {tuple(k.shape)}, g {tuple(g.shape)}")
    if v.shape[:3] != (B, T, Hkv):
        raise ValueError(f"v must be [B, T, Hkv, V] with B, T, Hkv = {(B, T, Hkv)}, got {tuple(v.shape)}")
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    return B, T, H, Hkv, K, v.shape[3]


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Cast to the accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _initial_state(initial_state, B, Hkv, K, V, like: torch.Tensor) -> torch.Tensor:
    if initial_state is None:
        return torch.zeros(B, Hkv, K, V, dtype=_acc(like).dtype, device=like.device)
    if initial_state.shape != (B, Hkv, K, V):
        raise ValueError(f"initial_state must be [B, Hkv, K, V] = {(B, Hkv, K, V)}, got {tuple(initial_state.shape)}")
    return _acc(initial_state)


def naive_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """Token-by-token GLA reference: repeats k, v, g over head groups and loops over time."""
    B, T, H, Hkv, K, V = _check_shapes(q, k, v, g)
    G = H // Hkv
    scale = K**-0.5 if scale is None else scale
    qf = _acc(q)
    kf, vf, gf = (_acc(x).repeat_interleave(G, dim=2) for x in (k, v, g))
    S = _initial_state(initial_state, B, Hkv, K, V, q).repeat_interleave(G, dim=1)
    outputs = []
    for t in range(T):
        S = gf[:, t].exp().unsqueeze(-1) * S + kf[:, t].unsqueeze(-1) * vf[:, t].unsqueeze(-2)
        outputs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t] * scale, S))
    o = torch.stack(outputs, dim=1) if outputs else qf.new_zeros(B, 0, H, V)
    final = S.view(B, Hkv, G, K, V)[:, :, 0] if output_final_state else None
    return o.to(v.dtype), final


def recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """Step-by-step GLA for decoding (a few tokens): state per key/value head, no repeats."""
    B, T, H, Hkv, K, V = _check_shapes(q, k, v, g)
    G = H // Hkv
    scale = K**-0.5 if scale is None else scale
    S = _initial_state(initial_state, B, Hkv, K, V, q).reshape(B * Hkv, K, V)  # heads flattened: batched products
    qg = _acc(q).view(B, T, Hkv, G, K) * scale
    kf, vf, decay = _acc(k), _acc(v), _acc(g).exp()
    outputs = []
    for t in range(T):
        S = torch.baddbmm(decay[:, t].reshape(B * Hkv, K, 1) * S, kf[:, t].reshape(B * Hkv, K, 1), vf[:, t].reshape(B * Hkv, 1, V))
        outputs.append(torch.bmm(qg[:, t].reshape(B * Hkv, G, K), S).view(B, H, V))
    if T == 1:  # a decode step: no stacking copy
        o = outputs[0].unsqueeze(1)
    else:
        o = torch.stack(outputs, dim=1) if outputs else qg.new_zeros(B, 0, H, V)
    return o.to(v.dtype), (S.view(B, Hkv, K, V) if output_final_state else None)


#: chunk_gla processes longer inputs in segments of about this many tokens (bounded temporaries).
SEGMENT_TOKENS = 8192

#: Largest in-chunk cumulative log decay ``|b|`` (any position and channel) for which the scores
#: of a whole chunk are factored through its start: factors stay within [e^-30, e^30], far from
#: fp32 underflow and overflow, so the result equals the elementwise form within rounding.
FACTORED_MAX_SPAN = 30.0


def _segmented(kernel, inputs: tuple[torch.Tensor, ...], state: torch.Tensor, chunk_size: int):
    """``(o, final_state)`` of a chunked kernel run over chunk-aligned segments of about ``SEGMENT_TOKENS``
    (bounded temporaries), the state carried between them; None when the input fits in one segment.
    ``kernel(*segment_inputs, state)`` returns ``(o, final_state)``; inputs are sequence-second."""
    T = inputs[0].shape[1]
    segment = chunk_size * max(1, SEGMENT_TOKENS // chunk_size)
    if T <= segment:
        return None
    outputs = []
    for start in range(0, T, segment):
        part = slice(start, start + segment)
        o, state = kernel(*(x[:, part] for x in inputs), state)
        outputs.append(o)
    return torch.cat(outputs, dim=1), state


def _chunk_blocks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[B, T, heads, D]`` (or ``[B, T, heads]``, as ``D = 1``) -> ``[B, heads, N, C, D]`` in the accumulation dtype,
    zero-padded to whole chunks (zero keys, values and log decays leave a state unchanged)."""
    x = _acc(x)
    x = x.unsqueeze(-1) if x.dim() == 3 else x
    B, T, heads = x.shape[:3]
    pad = (-T) % chunk_size
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
    return x.view(B, (T + pad) // chunk_size, chunk_size, heads, -1).permute(0, 3, 1, 2, 4)


def _intra_chunk_scores(
    q: torch.Tensor, k: torch.Tensor, b: torch.Tensor, sub: int, q_decayed: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal in-chunk scores ``A[i, j] = sum_d q_i k_j exp(b_i - b_j)`` for ``j <= i``, zero above.

    ``q``: [B, Hkv, N, G, C, K]; ``k``, ``b``: [B, Hkv, N, C, K] (``b`` = in-chunk cumulative
    log decay, non-increasing). Chunks where ``|b|`` stays at most ``FACTORED_MAX_SPAN`` (the
    usual case: the model's gates decay by ~0.05 per token) use one matmul of
    ``q exp(b)`` and ``k exp(-b)``; the others are computed sub-chunk by sub-chunk with every
    exponent <= 0 (:func:`_intra_chunk_scores_subchunked`), so strong decays underflow to zero
    instead of overflowing. ``q_decayed`` may pass ``q * exp(b)`` when the caller has it.
    """
    C = q.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    factored = b.abs().amax((-2, -1)) <= FACTORED_MAX_SPAN  # [B, Hkv, N]
    # The clamp only bites in chunks recomputed below; it keeps their factors (and gradients) finite.
    q_down = q * b.exp().unsqueeze(-3) if q_decayed is None else q_decayed
    k_up = k * (-b).clamp(max=FACTORED_MAX_SPAN).exp()
    A = torch.matmul(q_down, k_up.unsqueeze(-3).transpose(-1, -2))  # [B, Hkv, N, G, C, C]
    A = A.masked_fill(~causal, 0.0)
    if not bool(factored.all()):
        rows = (~factored).nonzero(as_tuple=True)
        A = A.index_put(rows, _intra_chunk_scores_subchunked(q[rows], k[rows], b[rows], sub))
    return A


def _intra_chunk_scores_subchunked(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor, sub: int) -> torch.Tensor:
    """The scores of :func:`_intra_chunk_scores` with every evaluated exponent <= 0.

    ``q``: [..., G, C, K]; ``k``, ``b``: [..., C, K]. Blocks below the diagonal are factored
    through the log decay at the end of the previous sub-chunk, diagonal blocks are computed
    elementwise.
    """
    C = q.shape[-2]
    A = q.new_zeros(*q.shape[:-1], C)
    causal = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril()
    for start in range(0, C, sub):
        rows = slice(start, start + sub)
        q_rows, b_rows = q[..., rows, :], b[..., rows, :]
        if start:
            ref = b[..., start - 1 : start, :]
            q_scaled = q_rows * (b_rows - ref).exp().unsqueeze(-3)
            k_scaled = k[..., :start, :] * (ref - b[..., :start, :]).exp()
            A[..., rows, :start] = torch.matmul(q_scaled, k_scaled.unsqueeze(-3).transpose(-1, -2))
        diff = b_rows.unsqueeze(-2) - b_rows.unsqueeze(-3)  # [.., i, j, K]: b_i - b_j
        decay = diff.masked_fill(~causal.unsqueeze(-1), float("-inf")).exp()
        weighted_k = decay * k[..., rows, :].unsqueeze(-3)  # [.., i, j, K]
        # A[g, i, j] = sum_k q[g, i, k] * weighted_k[i, j, k], batched over i
        diag = torch.matmul(q_rows.transpose(-2, -3), weighted_k.transpose(-1, -2))  # [.., i, G, j]
        A[..., rows, rows] = diag.transpose(-2, -3)
    return A


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, chunk_size=64, sub_chunk_size=16):
    """Chunked GLA: matmuls inside chunks, a state carried between chunks (prefill and training)."""
    B, T, H, Hkv, K, V = _check_shapes(q, k, v, g)
    if chunk_size % sub_chunk_size:
        raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of sub_chunk_size ({sub_chunk_size})")
    G = H // Hkv
    C = chunk_size
    scale = K**-0.5 if scale is None else scale
    S = _initial_state(initial_state, B, Hkv, K, V, q)
    if T == 0:
        return v.new_zeros(B, 0, H, V), (S if output_final_state else None)

    def kernel(q_, k_, v_, g_, state):
        return chunk_gla(q_, k_, v_, g_, scale, state, True, chunk_size, sub_chunk_size)

    segmented = _segmented(kernel, (q, k, v, g), S, C)
    if segmented is not None:
        o, S = segmented
        return o, (S if output_final_state else None)
    N = -(-T // C)

    qb = _chunk_blocks(q, C).reshape(B, Hkv, G, N, C, K).transpose(2, 3) * scale  # [B, Hkv, N, G, C, K]
    kb, vb, gb = (_chunk_blocks(x, C) for x in (k, v, g))
    b = gb.cumsum(dim=3)  # [B, Hkv, N, C, K], non-increasing along C
    b_last = b[..., -1:, :]
    # State contribution of each chunk, decayed to the chunk's end.
    chunk_updates = torch.matmul((kb * (b_last - b).exp()).transpose(-1, -2), vb)  # [B, Hkv, N, K, V]
    chunk_decay = b_last.squeeze(-2).exp().unsqueeze(-1)  # [B, Hkv, N, K, 1]
    states = []  # the state at each chunk's start; unbind and stack, not per-chunk indexing (its backward is O(N^2))
    for update, decay in zip(chunk_updates.unbind(2), chunk_decay.unbind(2)):
        states.append(S)
        S = torch.addcmul(update, decay, S)
    states = torch.stack(states, dim=2)
    q_decayed = qb * b.exp().unsqueeze(3)  # decayed to the chunk start: exponents <= 0
    inter = torch.matmul(q_decayed.reshape(B, Hkv, N, G * C, K), states)
    A = _intra_chunk_scores(qb, kb, b, sub_chunk_size, q_decayed).reshape(B, Hkv, N, G * C, C)
    o = torch.baddbmm(
        inter.reshape(-1, G * C, V), A.reshape(-1, G * C, C), vb.reshape(-1, C, V)
    ).view(B, Hkv, N, G, C, V)
    o = o.permute(0, 2, 4, 1, 3, 5).reshape(B, N * C, H, V)[:, :T]
    return o.to(v.dtype), (S if output_final_state else None)


class _KernelSwitch:
    """Whether :func:`prefill_gla` may take the C recurrence (:func:`gla_kernel`)."""

    enabled = True


def gla_kernel(enabled: bool) -> None:
    """Let prefills take the C recurrence where it applies (True, the default), or always ``chunk_gla`` (False)."""
    _KernelSwitch.enabled = bool(enabled)


@functools.cache
def _recurrence_library() -> ctypes.CDLL | None:
    """The built ``kernels/gla_recurrence.c`` where this CPU has AVX-512, else None."""
    lib = load_kernel("gla_recurrence")
    if lib is None or not lib.sb_gla_recurrence_supported():
        return None
    lib.sb_gla_recurrence.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_int]
    lib.sb_gla_recurrence.restype = ctypes.c_int
    return lib


#: the largest key head size the C recurrence takes (its state slice lives in a fixed local buffer)
KERNEL_MAX_KEY_DIM = 512


def gla_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether :func:`kernel_gla` takes these inputs: fp32 on a CPU with AVX-512, no gradient wanted, a key head size
    up to :data:`KERNEL_MAX_KEY_DIM`."""
    tensors = (q, k, v, g)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors) or q.shape[-1] > KERNEL_MAX_KEY_DIM:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return _recurrence_library() is not None


def kernel_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """GLA by its token recurrence in C (``kernels/gla_recurrence.c``): the outputs of :func:`naive_gla`, with a
    ``[K, V]`` state per key/value head and no repeats; for prefills on CPU (check :func:`gla_kernel_applies`)."""
    B, T, H, Hkv, K, V = _check_shapes(q, k, v, g)
    scale = K**-0.5 if scale is None else scale
    state = _initial_state(initial_state, B, Hkv, K, V, q).clone(memory_format=torch.contiguous_format)  # the kernel writes it
    out = torch.empty(B, T, H, V)
    q = (q * scale).contiguous()  # as the reference scales it, before the products
    k, v = k.contiguous(), v.contiguous()
    decay = g.exp().contiguous()
    failed = _recurrence_library().sb_gla_recurrence(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), decay.data_ptr(), state.data_ptr(), out.data_ptr(), B, T, H, Hkv, K, V,
        kernel_threads(),
    )
    if failed:
        raise ValueError(f"the GLA kernel takes key head sizes up to {KERNEL_MAX_KEY_DIM}, got {K}")
    return out, (state if output_final_state else None)


def prefill_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, chunk_size=64, sub_chunk_size=16):
    """GLA over many tokens: the C recurrence (:func:`kernel_gla`) where it applies and is on (:func:`gla_kernel`),
    else :func:`chunk_gla` (on GPUs, with gradients, in other dtypes)."""
    if _KernelSwitch.enabled and gla_kernel_applies(q, k, v, g):
        return kernel_gla(q, k, v, g, scale, initial_state, output_final_state)
    return chunk_gla(q, k, v, g, scale, initial_state, output_final_state, chunk_size, sub_chunk_size)
