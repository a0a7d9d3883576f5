"""Analytical FLOP counts of a SpikingBrain prefill, used to turn tokens/s into GFLOP/s.

What is counted (one multiply-add = 2 FLOPs, batch 1 unless ``batch`` is given):

* **Projections** — ``2 * weights`` per token for every linear layer of every block: q, k,
  v, o of each mixer, the GLA low-rank gate (``hidden -> rank -> kv_heads * head_dim``),
  and the SwiGLU gate, up and down matrices. Biases are not counted.
* **lm_head** — ``2 * hidden * vocab`` for the kept logits only (``logits_to_keep``
  positions; 0 keeps every position, as in the model).
* **GLA mixing** (chunked form, chunk ``gla_chunk_size``; chunks restart at every step of
  streaming prefill when the input is longer than ``streaming_chunk_size``):
  intra-chunk scores ``2 * K`` and intra-chunk values ``2 * V`` per causal (query, key)
  pair inside a chunk and per query head (``c (c + 1) / 2`` pairs in a chunk of ``c``
  tokens), the inter-chunk read-out ``q S`` (``2 K V`` per token and query head) and the
  state update ``k^T v`` (``2 K V`` per token and key/value head).
* **Softmax attention** — ``4 * H * D`` per (query, attended key) pair (``2 D`` for
  ``q k`` and ``2 D`` for ``p v`` per query head): a sliding-window query at 0-indexed
  position ``p`` attends ``min(p, W) + 1`` keys (``W = config.attention_window``), a
  full-attention query ``p + 1`` keys.

Not counted: embeddings, norms, activations, rotary, residual adds, softmax
exponentials, gate log-sigmoids, decay exponentials and cumulative sums, state decays,
padding or masked-out work a kernel may do. The count is therefore the useful matmul
work of the model, independent of how a kernel schedules it.
"""

from __future__ import annotations

__all__ = ["prefill_flops", "projection_params_per_token", "gla_mixing_flops", "attended_keys"]


def projection_params_per_token(config) -> dict[str, int]:
    """Weights (no biases) of the projections applied to every token, summed per kind over all layers."""
    h, D = config.hidden_size, config.head_dim
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    qkvo = h * H * D + 2 * h * Hkv * D + H * D * h
    gate = h * Hkv * D if config.gla_gate_rank == 0 else h * config.gla_gate_rank + config.gla_gate_rank * Hkv * D
    mlp = 3 * h * config.intermediate_size
    n_gla = sum(1 for m in config.layer_mixers if m == "gla")
    return {
        "attention_projections": qkvo * config.num_hidden_layers,
        "gla_gate": gate * n_gla,
        "mlp": mlp * config.num_hidden_layers,
    }


def _segments(length: int, step: int) -> list[int]:
    """Lengths of the forward calls of a prefill: one call, or streaming steps of ``step`` tokens."""
    if length <= step:
        return [length] if length else []
    return [min(step, length - start) for start in range(0, length, step)]


def gla_mixing_flops(length: int, heads: int, kv_heads: int, head_k: int, head_v: int, chunk: int) -> int:
    """FLOPs of one chunked GLA call over ``length`` tokens (intra-chunk, read-out and state update)."""
    full, rest = divmod(length, chunk)
    pairs = full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2
    intra = heads * pairs * 2 * (head_k + head_v)
    readout = heads * length * 2 * head_k * head_v
    update = kv_heads * length * 2 * head_k * head_v
    return intra + readout + update


def attended_keys(length: int, window: int | None) -> int:
    """Sum over queries ``p = 0 .. length-1`` of the keys attended: ``min(p, window) + 1`` (all if None)."""
    if window is None or length <= window + 1:
        return length * (length + 1) // 2
    return (window + 1) * (window + 2) // 2 + (length - window - 1) * (window + 1)


def prefill_flops(config, length: int, logits_to_keep: int = 1, batch: int = 1) -> dict[str, int]:
    """FLOPs of ``model(ids[:, :length], use_cache=True, logits_to_keep=...)`` by kind, with ``total``."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    params = projection_params_per_token(config)
    counts = {kind: 2 * n * length for kind, n in params.items()}
    kept = length if not logits_to_keep else min(logits_to_keep, length)
    counts["lm_head"] = 2 * config.hidden_size * config.vocab_size * kept
    segments = _segments(length, config.streaming_chunk_size)
    gla_call = sum(gla_mixing_flops(s, H, Hkv, D, D, config.gla_chunk_size) for s in segments)
    n = {m: sum(1 for x in config.layer_mixers if x == m) for m in ("gla", "swa", "full")}
    counts["gla_mixing"] = n["gla"] * gla_call
    counts["swa_attention"] = n["swa"] * 4 * H * D * attended_keys(length, config.attention_window)
    counts["full_attention"] = n["full"] * 4 * H * D * attended_keys(length, None)
    counts = {kind: batch * value for kind, value in counts.items()}
    counts["total"] = sum(counts.values())
    return counts
