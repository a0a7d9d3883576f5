"""Gated delta rule kernels in plain PyTorch: linear attention whose state overwrites what a key held.

Shapes and conventions as in :mod:`.gla` (``q`` ``[B, T, H, K]``; ``k``, ``g`` ``[B, T, Hkv, K]``; ``v``
``[B, T, Hkv, V]``; grouped query heads share a key/value head's state), plus the write strength
``beta`` ``[B, T, Hkv]`` in [0, 1]. Per key/value head, with ``a_t = exp(g_t)`` a per-key-channel decay,

    S'_t = diag(a_t) S_{t-1}
    S_t  = S'_t + beta_t k_t^T (v_t - k_t S'_t),        o_t = scale * q_t S_t

that is ``S_t = (I - beta_t k_t^T k_t) S'_t + beta_t k_t^T v_t``: the value stored under ``k_t`` moves a
fraction ``beta_t`` towards ``v_t`` instead of adding to it (the gated delta rule; with one decay per
head it is Gated DeltaNet, with one per channel it is the form Kimi Delta Attention uses). Keys of
unit length keep the state bounded; the mixer normalises them. States are fp32.
"""

from __future__ import annotations

import torch

from .gla import _acc, _check_shapes, _chunk_blocks, _initial_state, _intra_chunk_scores, _segmented

__all__ = ["chunk_delta_rule", "recurrent_delta_rule"]


def _check_beta(beta: torch.Tensor, k: torch.Tensor) -> None:
    if beta.shape != k.shape[:3]:
        raise ValueError(f"beta must be [B, T, Hkv] = {tuple(k.shape[:3])}, got {tuple(beta.shape)}")


def recurrent_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Step-by-step gated delta rule for decoding (a few tokens): state per key/value head."""
    B, T, H, Hkv, K, V = _check_shapes(q, k, v, g)
    _check_beta(beta, k)
    G = H // Hkv
    scale = K**-0.5 if scale is None else scale
    S = _initial_state(initial_state, B, Hkv, K, V, q)
    qg = _acc(q).view(B, T, Hkv, G, K) * scale
    kf, vf, decay, bf = _acc(k), _acc(v), _acc(g).exp(), _acc(beta)
    outputs = []
    for t in range(T):
        S = decay[:, t].unsqueeze(-1) * S
        stored = torch.matmul(kf[:, t].unsqueeze(-2), S).squeeze(-2)  # [B, Hkv, V]: what k_t reads now
        correction = bf[:, t].unsqueeze(-1) * (vf[:, t] - stored)
        S = S + kf[:, t].unsqueeze(-1) * correction.unsqueeze(-2)
        outputs.append(torch.matmul(qg[:, t], S))  # [B, Hkv, G, V]
    o = torch.stack(outputs, dim=1).reshape(B, T, H, V) if outputs else qg.new_zeros(B, 0, H, V)
    return o.to(v.dtype), (S if output_final_state else None)


def chunk_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=64, sub_chunk_size=16):
    """Chunked gated delta rule (prefill and training): one triangular solve per chunk, a state carried between chunks.

    Inside a chunk with in-chunk cumulative log decay ``b``, the corrections ``u_j`` (what token ``j`` adds
    under its key) satisfy ``(I + diag(beta) M) U = diag(beta) (V - (k exp(b)) S_0)`` with
    ``M[j, m] = sum_c k_jc k_mc exp(b_jc - b_mc)`` for ``m < j``; outputs and the next state follow as for GLA.
    """
    B, T, H, Hkv, K, V = _check_shapes(q, k, v, g)
    _check_beta(beta, k)
    if chunk_size % sub_chunk_size:
        raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of sub_chunk_size ({sub_chunk_size})")
    G, C = H // Hkv, chunk_size
    scale = K**-0.5 if scale is None else scale
    S = _initial_state(initial_state, B, Hkv, K, V, q)
    if T == 0:
        return v.new_zeros(B, 0, H, V), (S if output_final_state else None)

    def kernel(q_, k_, v_, g_, beta_, state):
        return chunk_delta_rule(q_, k_, v_, g_, beta_, scale, state, True, chunk_size, sub_chunk_size)

    segmented = _segmented(kernel, (q, k, v, g, beta), S, C)
    if segmented is not None:
        o, S = segmented
        return o, (S if output_final_state else None)
    N = -(-T // C)
    # zero padding writes nothing (k = 0, beta = 0) and keeps the state (g = 0)
    qb = _chunk_blocks(q, C).reshape(B, Hkv, G, N, C, K).transpose(2, 3) * scale  # [B, Hkv, N, G, C, K]
    kb, vb, gb, betab = (_chunk_blocks(x, C) for x in (k, v, g, beta))  # betab: [B, Hkv, N, C, 1]
    b = gb.cumsum(dim=3)
    b_last, decay_from_start = b[..., -1:, :], b.exp()
    key_scores = _intra_chunk_scores(kb.unsqueeze(3), kb, b, sub_chunk_size).squeeze(3)  # [B, Hkv, N, C, C]
    eye = torch.eye(C, dtype=kb.dtype, device=kb.device)
    system = eye + betab * key_scores.tril(-1)
    rhs = torch.cat((betab * vb, betab * kb * decay_from_start), dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    corrections_without_state, state_weights = solved[..., :V], solved[..., V:]  # u = first - second @ S_0
    q_decayed = qb * decay_from_start.unsqueeze(3)
    scores = _intra_chunk_scores(qb, kb, b, sub_chunk_size, q_decayed).reshape(B, Hkv, N, G * C, C)
    q_decayed = q_decayed.reshape(B, Hkv, N, G * C, K)
    k_to_end = (kb * (b_last - b).exp()).transpose(-1, -2)  # [B, Hkv, N, K, C]
    chunk_decay = b_last.squeeze(-2).exp().unsqueeze(-1)  # [B, Hkv, N, K, 1]
    outputs = []
    # one unbind per tensor, not an index per chunk: the backward of x[:, :, n] writes a zero tensor of all of x
    per_chunk = zip(*(x.unbind(2) for x in (corrections_without_state, state_weights, q_decayed, scores, k_to_end, chunk_decay)))
    for first, weights, q_n, scores_n, k_n, decay_n in per_chunk:
        u = first - torch.matmul(weights, S)  # [B, Hkv, C, V]
        outputs.append(torch.matmul(q_n, S) + torch.matmul(scores_n, u))
        S = decay_n * S + torch.matmul(k_n, u)
    o = torch.stack(outputs, dim=2).view(B, Hkv, N, G, C, V)
    o = o.permute(0, 2, 4, 1, 3, 5).reshape(B, N * C, H, V)[:, :T]
    return o.to(v.dtype), (S if output_final_state else None)
