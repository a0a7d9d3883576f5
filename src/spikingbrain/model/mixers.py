"""Token mixers: gated linear attention, softmax attention (sliding-window or full) and their parallel hybrid."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..ops import (
    causal_attention, chunk_delta_rule, prefill_gla, recurrent_delta_rule, recurrent_gla, rotate_query_key, sliding_window_attention,
)
from ..ops.attention import Int8Rows
from ..ops.integer_attention import bf16_values_supported, integer_attention, integer_attention_applies
from ..spiking.int8 import fake_quantize_int8
from ..spiking.neuron import spike_counts, spike_quantize
from .cache import FullKV, GLAState, ParallelState, RowCaches, WindowKV, stack_states, unstack_states
from .config import SpikingBrainConfig
from .layers import RMSNorm
from .names import PARALLEL_MIXERS

__all__ = ["MixerInputs", "GatedLinearAttention", "SoftmaxAttention", "ParallelHybridAttention", "build_mixer"]

#: Up to this many new tokens, GLA runs the token-by-token recurrence instead of the chunked kernel.
RECURRENT_MAX_TOKENS = 16


def bf16_values_available() -> bool:
    """Whether this CPU sums attention values in bf16, as ``attention_values_dtype: bfloat16`` asks; warns where not."""
    if bf16_values_supported():
        return True
    warnings.warn("attention_values_dtype: bfloat16 needs a CPU with AVX-512 VNNI and BF16; this one lacks them, so the "
                  "integer attention sums its values in float32 (exact, slower)", stacklevel=2)
    return False


@dataclass
class MixerInputs:
    """What every mixer needs beside the hidden states, shared by all layers of one forward."""

    cos: torch.Tensor  # [B, T, head_dim] rotary tables for the new positions
    sin: torch.Tensor
    key_mask: torch.Tensor | None  # [B, past + T] true for real tokens (None: no padding)

    def row(self, i: int) -> "MixerInputs":
        """The inputs of batch row ``i`` alone (rows of a batched decode step carry no padding mask)."""
        return MixerInputs(cos=self.cos[i : i + 1], sin=self.sin[i : i + 1], key_mask=None)

    def mask_of_last(self, length: int) -> torch.Tensor | None:
        """The padding mask of the last ``length`` positions (None: no padding)."""
        return None if self.key_mask is None else self.key_mask[:, self.key_mask.shape[1] - length :]

    def mask_of_keys(self, length: int, keep_first: int = 0) -> torch.Tensor | None:
        """The padding mask of ``length`` attended keys: the last positions, or the first ``keep_first``
        positions and then the last ones when a cache kept the first positions in front of its window."""
        if self.key_mask is None or length >= self.key_mask.shape[1] or not keep_first:
            return self.mask_of_last(length)
        return torch.cat((self.key_mask[:, :keep_first], self.mask_of_last(length - keep_first)), 1)


class _Mixer(nn.Module):
    """A token mixer, with the q/k/v (optional bias) and o (no bias) projections it reuses from a Transformer.

    ``projections=False`` builds the mixer without them: a parallel layer then passes its
    shared projections' outputs to :meth:`heads`.
    """

    def __init__(self, config: SpikingBrainConfig, projections: bool = True):
        super().__init__()
        hidden, D = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        if projections:
            bias = config.attention_bias
            self.q_proj = nn.Linear(hidden, self.num_heads * D, bias=bias)
            self.k_proj = nn.Linear(hidden, self.num_kv_heads * D, bias=bias)
            self.v_proj = nn.Linear(hidden, self.num_kv_heads * D, bias=bias)
            self.o_proj = nn.Linear(self.num_heads * D, hidden, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, T, H, D]``, k and v ``[B, T, Hkv, D]``."""
        B, T, _ = x.shape
        return (
            self.q_proj(x).view(B, T, self.num_heads, self.head_dim),
            self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim),
            self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim),
        )

    def heads(self, x, q, k, v, inputs: MixerInputs, cache, proj: "_Mixer") -> torch.Tensor:
        """Per-head outputs ``[B, T, H, D]`` from projected (not yet rotated or mapped) ``q, k, v``;
        ``proj`` owns the projections (for sink keys and values)."""
        raise NotImplementedError

    def heads_of_rows(self, x, q, k, v, inputs: MixerInputs, cache, proj: "_Mixer") -> torch.Tensor:
        """:meth:`heads`, one row at a time on its own entry when ``cache`` is a :class:`RowCaches`
        (exactly what a one-row forward computes; padding rows give zeros)."""
        if not isinstance(cache, RowCaches):
            return self.heads(x, q, k, v, inputs, cache, proj)
        out = q.new_zeros(q.shape)
        for i, entry in enumerate(cache.entries):
            if entry is not None:
                one = slice(i, i + 1)
                out[one] = self.heads(x[one], q[one], k[one], v[one], inputs.row(i), entry, proj)
        return out

    def forward(self, x: torch.Tensor, inputs: MixerInputs, cache) -> torch.Tensor:
        """Mix ``x`` ``[B, T, hidden]`` over time; ``cache`` is this layer's cache entry, a :class:`RowCaches` (or None)."""
        B, T, _ = x.shape
        o = self.heads_of_rows(x, *self.project(x), inputs, cache, self)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))


_FEATURE_MAPS = {"relu": nn.ReLU, "identity": nn.Identity, "sigmoid": nn.Sigmoid}


class GatedLinearAttention(_Mixer):
    """Gated linear attention with per-head RMSNorm: the 7B's ReLU features and low-rank log-sigmoid
    gate (``gla_gate="lowrank"``), or the 76B's key-tied gate ``1 - k`` on sigmoid features (``"key_tied"``);
    with ``gla_update="delta"``, a gated delta rule state (``ops.delta_rule``)."""

    def __init__(self, config: SpikingBrainConfig, projections: bool = True):
        super().__init__(config, projections)
        hidden, D = config.hidden_size, config.head_dim
        self.key_tied = config.gla_gate == "key_tied"
        if not self.key_tied and config.gla_gate_rank == 0:  # full rank: the released W8ASpike layout
            self.gk_proj = nn.Linear(hidden, self.num_kv_heads * D, bias=True)
        elif not self.key_tied:
            self.gk_proj = nn.Sequential(
                nn.Linear(hidden, config.gla_gate_rank, bias=False),
                nn.Linear(config.gla_gate_rank, self.num_kv_heads * D, bias=True),
            )
        self.delta = config.gla_update == "delta"
        if self.delta:  # write strength per key/value head
            self.beta_proj = nn.Linear(hidden, self.num_kv_heads, bias=True)
        self.g_norm = RMSNorm(D, eps=config.rms_norm_eps) if config.gla_output_norm else nn.Identity()
        self.feature_map = _FEATURE_MAPS[config.gla_feature_map]()
        self.gate_normalizer = config.gla_gate_normalizer
        self.chunk_size = config.gla_chunk_size

    @property
    def gate_bias(self) -> nn.Parameter:
        """The bias of the gate's output (low rank: of its second linear)."""
        return self.gk_proj.bias if isinstance(self.gk_proj, nn.Linear) else self.gk_proj[1].bias

    def log_decay(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Log decay per key channel ``[B, T, Hkv, D]`` (fp32) from the input and the key pre-activation.

        Key-tied: ``log(1 - sigmoid(k)) = logsigmoid(-k)``, finite for any k; low-rank:
        ``logsigmoid(W2 W1 x + b2) / gla_gate_normalizer``.
        """
        if self.key_tied:
            return F.logsigmoid(-k.float())
        return (F.logsigmoid(self.gk_proj(x).float()) / self.gate_normalizer).view(k.shape)

    def heads_of_rows(self, x, q, k, v, inputs, cache, proj=None) -> torch.Tensor:
        """:meth:`heads`; over a :class:`RowCaches`, all rows at once on their stacked states (the recurrence is per row)."""
        if not isinstance(cache, RowCaches):
            return self.heads(x, q, k, v, inputs, cache, proj)
        stacked = stack_states(cache.entries, (k.shape[2], k.shape[3], v.shape[3]), q)
        o = self.heads(x, q, k, v, inputs, stacked, proj)
        unstack_states(stacked, cache.entries)
        return o

    def heads(self, x, q, k, v, inputs, cache: GLAState | None, proj=None) -> torch.Tensor:
        B, T = x.shape[:2]
        g = self.log_decay(x, k)
        q, k = self.feature_map(q), self.feature_map(k)
        extra = ()
        if self.delta:  # unit-length q and k keep the delta rule's state bounded
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            extra = (torch.sigmoid(self.beta_proj(x).float()),)
        mask = inputs.mask_of_last(T)
        if mask is not None:  # padded positions neither write to nor decay the state
            keep = mask.view(B, T, 1, 1)
            k, v, g = (torch.where(keep, t, torch.zeros((), dtype=t.dtype)) for t in (k, v, g))
        initial = None if cache is None else cache.state
        step = T <= RECURRENT_MAX_TOKENS and not torch.is_grad_enabled()
        if self.delta:
            kernel = recurrent_delta_rule if step else chunk_delta_rule
        else:
            kernel = recurrent_gla if step else prefill_gla  # the C recurrence on CPU, else chunked
        kwargs = {}
        if not step:  # any chunk size: the sub-chunk (at most 16) must divide it
            kwargs = {"chunk_size": self.chunk_size, "sub_chunk_size": math.gcd(self.chunk_size, 16)}
        o, state = kernel(q, k, v, g, *extra, initial_state=initial, output_final_state=cache is not None, **kwargs)
        if cache is not None:
            cache.state = state
        return self.g_norm(o)


class SoftmaxAttention(_Mixer):
    """Qwen2-style attention with RoPE and GQA, over a sliding window (``swa``) or all keys (``full``).

    With ``num_sink_tokens`` the layer has learnable sink states ``[n, hidden]``; its k/v
    projections turn them into keys and values that every query sees. Sink keys are not
    rotated (the rotation of position 0), so real tokens keep positions 0, 1, ...; with a
    cache they are computed once, on the cache's first use. ``output_norm`` adds a per-head
    RMSNorm (the softmax branch of a parallel layer).
    """

    def __init__(self, config: SpikingBrainConfig, kind: str, projections: bool = True, output_norm: bool = False):
        super().__init__(config, projections)
        self.window = config.attention_window if kind == "swa" else None
        self.keep_first = config.keep_first_tokens if kind == "swa" else 0
        n = config.num_sink_tokens
        self.sinks = nn.Parameter(torch.empty(n, config.hidden_size)) if n else None
        self.norm = RMSNorm(config.head_dim, eps=config.rms_norm_eps) if output_norm else None
        self.query_spike_k: float | None = None  # W8ASpike options, set by spiking.spikify
        self.int8_kv = False
        self.attention_in_integers = True  # with both: the integer kernel where it applies (False: the fp32 simulation)
        # the kernel's weighted values in bf16 (an option: faster, not the simulation's); exact where the CPU lacks bf16
        self.bf16_attention_values = config.attention_values_dtype == "bfloat16" and bf16_values_available()

    def sink_keys_values(self, proj: _Mixer) -> tuple[torch.Tensor, torch.Tensor]:
        """Sink keys and values ``[1, n, Hkv, D]`` through ``proj``'s k/v projections (no rotation)."""
        shape = (1, self.sinks.shape[0], self.num_kv_heads, self.head_dim)
        return proj.k_proj(self.sinks).view(shape), proj.v_proj(self.sinks).view(shape)

    def heads(self, x, q, k, v, inputs, cache: WindowKV | FullKV | None, proj: _Mixer) -> torch.Tensor:
        B = x.shape[0]
        q, k = rotate_query_key(q, k, inputs.cos, inputs.sin)
        spikes = None  # (counts, thresholds) of a spiked query without gradients, for the integer attention kernel
        if self.query_spike_k and torch.is_grad_enabled():  # threshold per token and head
            q = spike_quantize(q, self.query_spike_k)
        elif self.query_spike_k:
            spikes = spike_counts(q, self.query_spike_k)
        n = 0 if self.sinks is None else self.sinks.shape[0]
        if n and (cache is None or cache.sinks is None):
            sinks = self.sink_keys_values(proj)
            if cache is None:
                k, v = (torch.cat((s.expand(B, *s.shape[1:]), t), 1) for s, t in zip(sinks, (k, v)))
            else:
                cache.set_sinks(*sinks)
        if cache is not None:
            if self.keep_first and inputs.key_mask is not None and not inputs.key_mask[:, : self.keep_first].all():
                raise ValueError(
                    "keep_first_tokens with a cache needs rows whose first tokens are real: the cache keeps the first "
                    "positions, which are padding in a left-padded row; pad on the right or run the rows one by one"
                )
            # a window cache may answer a one-token step with its ring buffer: keys out of order, all of them
            # attended, which is only right without a padding mask
            k, v = cache.extend(k, v) if self.window is None else cache.extend(k, v, ring=inputs.key_mask is None)
        mask = inputs.mask_of_keys(k.shape[1] - n, self.keep_first)
        if self.int8_kv and self.attention_in_integers and spikes is not None and mask is None \
                and integer_attention_applies(q, spikes[0], k, v):
            o = integer_attention(*spikes, k, v, self.window, num_sinks=n, keep_first=self.keep_first,  # W8ASpike in integers
                                  bf16_values=self.bf16_attention_values)
        else:
            if spikes is not None:  # the query a projection of the spikes sees: counts times threshold
                q = spikes[0].to(q.dtype) * spikes[1]
            if self.int8_kv and not isinstance(k, Int8Rows):  # at use time, per token and head; the cache keeps the
                k, v = fake_quantize_int8(k), fake_quantize_int8(v)  # unquantized values (an int8 ring holds these codes)
            if self.window is None:
                o = causal_attention(q, k, v, key_padding_mask=mask, num_sinks=n)
            else:
                o = sliding_window_attention(q, k, v, self.window, key_padding_mask=mask, num_sinks=n, keep_first=self.keep_first)
        return o if self.norm is None else self.norm(o)


class ParallelHybridAttention(_Mixer):
    """SpikingBrain-76B layer: gated linear attention in parallel with sliding-window or full attention.

    Each branch's per-head output is RMS-normalised (GLA's ``g_norm``, the softmax branch's
    ``norm``) and the two are combined with weights ``(1, 1)`` (``sum``), ``(1/2, 1/2)``
    (``mean``) or learned scalars ``branch_weights`` (initialised to 1/2). ``residual`` keeps the
    softmax branch unnormalised and adds the linear branch times per-head ``linear_weights``
    (initialised to 0): the layer then starts as plain softmax attention. Shared projections
    (default) feed one q/k/v to both branches and project their combination with one o_proj;
    separate projections give each branch its own q/k/v/o.
    """

    def __init__(self, config: SpikingBrainConfig, kind: str):
        shared = config.parallel_shared_projections
        super().__init__(config, projections=shared)
        self.shared = shared
        self.linear = GatedLinearAttention(config, projections=not shared)
        self.combine = config.parallel_combine
        self.softmax = SoftmaxAttention(config, kind, projections=not shared, output_norm=self.combine != "residual")
        if self.combine == "learned":
            self.branch_weights = nn.Parameter(torch.full((2,), 0.5))
        elif self.combine == "residual":  # per head, broadcast over [B, T, H, D] outputs
            self.linear_weights = nn.Parameter(torch.zeros(config.num_attention_heads, 1))

    def weights(self) -> tuple:
        """Weights of the linear and the softmax branch."""
        if self.combine == "learned":
            return self.branch_weights[0], self.branch_weights[1]
        if self.combine == "residual":
            return self.linear_weights, 1.0
        return (1.0, 1.0) if self.combine == "sum" else (0.5, 0.5)

    def forward(self, x: torch.Tensor, inputs: MixerInputs, cache: ParallelState | RowCaches | None) -> torch.Tensor:
        linear_cache, softmax_cache = (None, None) if cache is None else (cache.linear, cache.softmax)
        w_linear, w_softmax = self.weights()
        if not self.shared:
            return w_linear * self.linear(x, inputs, linear_cache) + w_softmax * self.softmax(x, inputs, softmax_cache)
        B, T, _ = x.shape
        q, k, v = self.project(x)
        o = w_linear * self.linear.heads_of_rows(x, q, k, v, inputs, linear_cache, None) + w_softmax * self.softmax.heads_of_rows(
            x, q, k, v, inputs, softmax_cache, self
        )
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))


def build_mixer(config: SpikingBrainConfig, mixer: str) -> nn.Module:
    """The token mixer named ``mixer`` for ``config``."""
    if mixer == "gla":
        return GatedLinearAttention(config)
    if mixer in ("swa", "full"):
        return SoftmaxAttention(config, mixer)
    if mixer in PARALLEL_MIXERS:
        return ParallelHybridAttention(config, mixer.removeprefix("parallel-"))
    raise ValueError(f"unknown mixer {mixer!r}")
