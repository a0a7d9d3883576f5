"""Pure tensor functions: GLA kernels, causal and sliding-window attention, rotary."""

from .attention import causal_attention, sliding_window_attention
from .gla import chunk_gla, naive_gla, recurrent_gla
from .rotary import apply_rotary, rotary_cos_sin, rotary_inv_freq

__all__ = [
    "apply_rotary",
    "causal_attention",
    "chunk_gla",
    "naive_gla",
    "recurrent_gla",
    "rotary_cos_sin",
    "rotary_inv_freq",
    "sliding_window_attention",
]
