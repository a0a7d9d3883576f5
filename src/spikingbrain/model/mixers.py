"""Token mixers: gated linear attention and softmax attention (sliding-window or full)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..ops import apply_rotary, causal_attention, chunk_gla, recurrent_gla, sliding_window_attention
from .cache import FullKV, GLAState, WindowKV
from .config import SpikingBrainConfig
from .layers import RMSNorm

__all__ = ["MixerInputs", "GatedLinearAttention", "SoftmaxAttention", "build_mixer"]

#: Up to this many new tokens, GLA runs the token-by-token recurrence instead of the chunked kernel.
RECURRENT_MAX_TOKENS = 16


@dataclass
class MixerInputs:
    """What every mixer needs beside the hidden states, shared by all layers of one forward."""

    cos: torch.Tensor  # [B, T, head_dim] rotary tables for the new positions
    sin: torch.Tensor
    key_mask: torch.Tensor | None  # [B, past + T] true for real tokens (None: no padding)


def _tail(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    return None if mask is None else mask[:, mask.shape[1] - length :]


class _Projections(nn.Module):
    """The q/k/v (optional bias) and o (no bias) projections every mixer reuses from a Transformer."""

    def __init__(self, config: SpikingBrainConfig):
        super().__init__()
        hidden, D = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
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


class GatedLinearAttention(_Projections):
    """SpikingBrain-7B linear attention: ReLU features, low-rank log-sigmoid gate, per-head RMSNorm."""

    def __init__(self, config: SpikingBrainConfig):
        super().__init__(config)
        hidden, D = config.hidden_size, config.head_dim
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden, config.gla_gate_rank, bias=False),
            nn.Linear(config.gla_gate_rank, self.num_kv_heads * D, bias=True),
        )
        self.g_norm = RMSNorm(D, eps=config.rms_norm_eps) if config.gla_output_norm else nn.Identity()
        self.feature_map = nn.ReLU() if config.gla_feature_map == "relu" else nn.Identity()
        self.gate_normalizer = config.gla_gate_normalizer
        self.chunk_size = config.gla_chunk_size

    def forward(self, x: torch.Tensor, inputs: MixerInputs, cache: GLAState | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q, k = self.feature_map(q), self.feature_map(k)
        g = (F.logsigmoid(self.gk_proj(x).float()) / self.gate_normalizer).view(B, T, self.num_kv_heads, self.head_dim)
        mask = _tail(inputs.key_mask, T)
        if mask is not None:  # padded positions neither write to nor decay the state
            keep = mask.view(B, T, 1, 1)
            k, v, g = (torch.where(keep, t, torch.zeros((), dtype=t.dtype)) for t in (k, v, g))
        initial = None if cache is None else cache.state
        kernel = recurrent_gla if T <= RECURRENT_MAX_TOKENS and not torch.is_grad_enabled() else chunk_gla
        kwargs = {}
        if kernel is chunk_gla:  # any chunk size: the sub-chunk (at most 16) must divide it
            kwargs = {"chunk_size": self.chunk_size, "sub_chunk_size": math.gcd(self.chunk_size, 16)}
        o, state = kernel(q, k, v, g, initial_state=initial, output_final_state=cache is not None, **kwargs)
        if cache is not None:
            cache.state = state
        o = self.g_norm(o).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(o)


class SoftmaxAttention(_Projections):
    """Qwen2-style attention with RoPE and GQA, over a sliding window (``swa``) or all keys (``full``)."""

    def __init__(self, config: SpikingBrainConfig, mixer: str):
        super().__init__(config)
        self.window = config.attention_window if mixer == "swa" else None

    def forward(self, x: torch.Tensor, inputs: MixerInputs, cache: WindowKV | FullKV | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q, k = apply_rotary(q, inputs.cos, inputs.sin), apply_rotary(k, inputs.cos, inputs.sin)
        if cache is not None:
            k, v = cache.extend(k, v)
        mask = _tail(inputs.key_mask, k.shape[1])
        if self.window is None:
            o = causal_attention(q, k, v, key_padding_mask=mask)
        else:
            o = sliding_window_attention(q, k, v, self.window, key_padding_mask=mask)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))


def build_mixer(config: SpikingBrainConfig, mixer: str) -> nn.Module:
    """The token mixer named ``mixer`` for ``config``."""
    if mixer == "gla":
        return GatedLinearAttention(config)
    if mixer in ("swa", "full"):
        return SoftmaxAttention(config, mixer)
    raise ValueError(f"unknown mixer {mixer!r}")
