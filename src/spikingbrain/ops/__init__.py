"""Pure tensor functions: GLA and gated delta rule kernels, causal and sliding-window attention, rotary, whether int8 matmuls work."""

from .attention import causal_attention, sliding_window_attention
from .delta_rule import chunk_delta_rule, recurrent_delta_rule
from .gla import chunk_gla, gla_kernel, kernel_gla, naive_gla, prefill_gla, recurrent_gla
from .int8 import int8_matmul_available
from .rotary import apply_rotary, rotary_cos_sin, rotary_inv_freq, rotate_query_key

__all__ = [
    "apply_rotary",
    "rotate_query_key",
    "causal_attention",
    "chunk_delta_rule",
    "chunk_gla",
    "gla_kernel",
    "kernel_gla",
    "int8_matmul_available",
    "naive_gla",
    "prefill_gla",
    "recurrent_delta_rule",
    "recurrent_gla",
    "rotary_cos_sin",
    "rotary_inv_freq",
    "sliding_window_attention",
]
