"""Pure tensor functions: GLA kernels, causal and sliding-window attention, rotary, integer matmuls."""

from .attention import causal_attention, sliding_window_attention
from .gla import chunk_gla, naive_gla, recurrent_gla
from .int8 import int8_matmul_available, integer_matmul, split_digits
from .rotary import apply_rotary, rotary_cos_sin, rotary_inv_freq

__all__ = [
    "apply_rotary",
    "causal_attention",
    "chunk_gla",
    "int8_matmul_available",
    "integer_matmul",
    "naive_gla",
    "recurrent_gla",
    "rotary_cos_sin",
    "rotary_inv_freq",
    "sliding_window_attention",
    "split_digits",
]
