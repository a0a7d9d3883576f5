"""W8ASpike's softmax attention in integers: spike-count queries times int8 keys, through a C kernel with AVX-512 VNNI
(``kernels/integer_attention.c``).

The query of a W8ASpike attention layer is ``counts · threshold`` (one threshold per token and head) and its keys
and values are int8 codes times a scale per token and head, so each score is an integer product times two scales.
The kernel sums those products in int32 (VNNI), runs the softmax online in fp32 over tiles of 128 keys, and sums the
weighted values in fp32 over the dequantised values: the simulation's numbers up to fp32 rounding. With
``bf16_values`` (an option, where the CPU has AVX-512 BF16) it rounds each weight times its value's scale to bf16 and
multiplies it with the value codes two keys at a time: half the instructions of that part, a relative rounding of
2^-9 per weight, so no longer the simulation's numbers.

Shapes and positions follow :func:`~spikingbrain.ops.attention.sliding_window_attention`: queries at the last ``Tq``
key positions, ``num_sinks`` sink keys in front, ``keep_first`` first keys visible to every later query.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .attention import Int8Rows
from .native import load_kernel
from .threads import kernel_threads

__all__ = ["integer_attention", "integer_attention_applies", "bf16_values_supported", "require_bf16_values", "SPIKE_COUNT_LIMIT"]

#: the largest query spike count (in magnitude) the kernel multiplies: counts are int8
SPIKE_COUNT_LIMIT = 127

_P, _I = ctypes.c_void_p, ctypes.c_int64


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernel where this CPU has AVX-512 VNNI, else None."""
    lib = load_kernel("integer_attention")
    if lib is None or not lib.sb_integer_attention_supported():
        return None
    lib.sb_integer_attention.argtypes = [_P, _P, _I, _I, _I, _I] + [_P, _I, _I, _I] * 4 + [_I] * 6 + [_P, ctypes.c_int]
    lib.sb_integer_attention.restype = ctypes.c_int
    return lib


def bf16_values_supported() -> bool:
    """Whether the kernel can sum the weighted values in bf16 here (AVX-512 BF16 besides VNNI)."""
    return _library() is not None and bool(_library().sb_integer_attention_bf16_supported())


def require_bf16_values() -> None:
    """A RuntimeError where :func:`bf16_values_supported` says no."""
    if not bf16_values_supported():
        raise RuntimeError("bf16 attention values need a CPU with AVX-512 VNNI and BF16; this one lacks them: leave them "
                           "off (fp32 values, the default)")


def integer_attention_applies(query: torch.Tensor, counts: torch.Tensor, k, v) -> bool:
    """Whether the kernel takes the spiking ``query`` with these ``counts``: an fp32 query on a CPU with AVX-512 VNNI,
    more than one query (a decode step has its own kernel), counts within :data:`SPIKE_COUNT_LIMIT`, a head size that
    is a multiple of 16, no gradient."""
    if query.dtype != torch.float32 or query.device.type != "cpu" or counts.shape[1] < 2 or counts.shape[-1] % 16 \
            or torch.is_grad_enabled():
        return False
    if any(isinstance(x, torch.Tensor) and x.requires_grad for x in (k, v)) or _library() is None:
        return False
    return int(counts.abs().max()) <= SPIKE_COUNT_LIMIT


def integer_attention(counts: torch.Tensor, thresholds: torch.Tensor, k, v, window: int | None = None, scale: float | None = None,
                      num_sinks: int = 0, keep_first: int = 0, bf16_values: bool = False) -> torch.Tensor:
    """Causal attention of the queries ``counts · thresholds`` (``[B, Tq, H, D]`` integer counts, ``[B, Tq, H, 1]``
    thresholds) over keys and values ``[B, Tk, Hkv, D]`` (``Int8Rows``, or floats quantized here as ``Int8Rows`` do),
    all keys (``window=None``) or a sliding window of ``window + 1``; fp32 ``[B, Tq, H, D]``. ``bf16_values``: the
    weighted values in bf16 (see the module's text; :func:`bf16_values_supported`). Check
    :func:`integer_attention_applies` first."""
    if bf16_values:
        require_bf16_values()
    B, Tq, H, D = counts.shape
    k, v = (x if isinstance(x, Int8Rows) else Int8Rows.quantized(x) for x in (k, v))
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or H % k.shape[2] or k.shape[1] - num_sinks < Tq:
        raise ValueError(f"incompatible queries {tuple(counts.shape)} and keys {tuple(k.shape)}, values {tuple(v.shape)}")
    scale = D**-0.5 if scale is None else scale
    codes = counts.to(torch.int8).contiguous()
    scales = (thresholds.float() * scale).expand(B, Tq, H, 1).contiguous()
    out = torch.empty(B, Tq, H, D)
    parts = []
    for rows in (k, v):
        parts += [rows.codes.data_ptr(), *rows.codes.stride()[:3], rows.scales.data_ptr(), *rows.scales.stride()]
    failed = _library().sb_integer_attention(
        codes.data_ptr(), scales.data_ptr(), B, Tq, H, D, *parts, k.shape[2], k.shape[1], num_sinks,
        -1 if window is None else window, keep_first, int(bf16_values), out.data_ptr(), kernel_threads(),
    )
    if failed:
        raise MemoryError(f"the integer attention kernel could not allocate its packed keys and values ({k.shape[1]} keys)")
    return out
