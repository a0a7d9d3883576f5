"""Integer matrix products on CPU: whether ``torch._int_mm`` (int8 × int8 -> int32) works on a device, oneDNN's int8
linear (``torch.ops.onednn.qlinear_pointwise``) for one row against a wide weight, and our AVX-512 VNNI kernel for
decode rows (``kernels/int8_rows.c``), which quantizes the rows, multiplies and dequantises in one call."""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch

from .native import load_kernel
from .threads import kernel_threads

__all__ = [
    "int8_matmul_available", "OneDnnInt8Weight", "onednn_int8_linear_available", "onednn_pack_int8_weight", "onednn_int8_row_product",
    "VNNI_MAX_ROWS", "VnniInt8Weight", "vnni_rows_available", "vnni_pack_int8_weight", "vnni_int8_rows_product",
    "vnni_checked_rows_product", "vnni_codes_product", "ClippedColumns",
]


@functools.cache
def _probe(device_type: str) -> bool:
    try:
        a = torch.ones(17, 8, dtype=torch.int8, device=device_type)
        return bool((torch._int_mm(a, a.t().contiguous()) == 8).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def int8_matmul_available(device: torch.device | str) -> bool:
    """Whether ``torch._int_mm`` works on ``device`` (CPU only: elsewhere its shape limits are not handled here)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return device_type == "cpu" and _probe(device_type)


class OneDnnInt8Weight(NamedTuple):
    """An INT8 weight as oneDNN's int8 linear takes it: the packed codes, per-output-channel scales ``[N]`` and zero
    points (all zero: symmetric codes)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor


def onednn_pack_int8_weight(codes: torch.Tensor, scales: torch.Tensor) -> OneDnnInt8Weight:
    """INT8 weight codes ``[N, K]`` with one scale per output channel (``N`` values), for :func:`onednn_int8_row_product`."""
    return OneDnnInt8Weight(torch.ops.onednn.qlinear_prepack(codes.contiguous(), None), scales.reshape(-1).float().contiguous(),
                            torch.zeros(codes.shape[0], dtype=torch.int64))


def onednn_int8_row_product(codes: torch.Tensor, scale: float, weight: OneDnnInt8Weight) -> torch.Tensor:
    """``scale · weight.scales · (codes @ Wᵀ)`` in fp32 for one row of int8 ``codes`` ``[1, K]`` (in ±127), int32
    accumulation.

    oneDNN takes the row as uint8 with zero point 128 (its int8 activations measured 400x slower here)."""
    shifted = (codes.to(torch.int16) + 128).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(shifted, scale, 128, weight.packed, weight.scales, weight.zero_points, None, 1.0, 0,
                                              torch.float32, "none", [], "")


@functools.cache
def onednn_int8_linear_available() -> bool:
    """Whether this torch build has oneDNN's int8 linear on CPU and it computes a hand-checked product."""
    try:
        codes = torch.tensor([[1, -2, 3], [127, 0, -127]], dtype=torch.int8)
        row = torch.tensor([[2, 5, -1]], dtype=torch.int8)
        y = onednn_int8_row_product(row, 0.5, onednn_pack_int8_weight(codes, torch.tensor([1.0, 0.25])))
        return torch.equal(y, torch.tensor([[0.5 * (2 - 10 - 3), 0.125 * (254 + 127)]]))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


#: Rows the VNNI kernel takes in one call (its accumulators for one block of outputs).
VNNI_MAX_ROWS = 8


class VnniInt8Weight(NamedTuple):
    """An INT8 weight ``[N, K]`` as the VNNI kernel takes it: codes in blocks of 16 outputs by 4 inputs, ``128 · Σ_k
    codes`` per output (the unsigned-input offset), per-output-channel scales ``[N]`` and the bias (or None); and the
    addresses of those four, taken once (the kernel's per-call cost matters: a decode step makes hundreds of calls)."""

    packed: torch.Tensor
    offsets: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    in_features: int
    addresses: tuple[int, int, int, int]


_P, _I = ctypes.c_void_p, ctypes.c_int64


@functools.cache
def _vnni_library() -> ctypes.CDLL | None:
    """The built kernel where this CPU has AVX-512 VNNI (and a compiler built it), else None."""
    lib = load_kernel("int8_rows")
    if lib is None or not lib.sb_cpu_supported():
        return None
    lib.sb_pack.argtypes = [_P, _I, _I, _P, _P]
    lib.sb_pack.restype = None
    lib.sb_rows.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _P, _I, ctypes.c_int, _P, _P, _P, ctypes.c_float, ctypes.c_float, ctypes.c_float]
    lib.sb_rows.restype = _I
    lib.sb_codes_product.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _P, _I, ctypes.c_int]
    lib.sb_codes_product.restype = ctypes.c_int
    return lib


def vnni_pack_int8_weight(codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> VnniInt8Weight:
    """INT8 codes ``[N, K]`` (``K`` a multiple of 4) with one scale per output channel, for :func:`vnni_int8_rows_product`."""
    lib = _vnni_library()
    if lib is None:
        raise RuntimeError("the VNNI int8 kernel is not available here (vnni_rows_available() is False)")
    n_out, n_in = codes.shape
    if n_in % 4:
        raise ValueError(f"the VNNI int8 kernel needs input features in multiples of 4, got {n_in}")
    codes = codes.detach().to(torch.int8).contiguous()
    blocks = -(-n_out // 16)
    packed = torch.empty(blocks * 16 * n_in, dtype=torch.int8)
    offsets = torch.empty(blocks * 16, dtype=torch.int32)
    lib.sb_pack(codes.data_ptr(), n_out, n_in, packed.data_ptr(), offsets.data_ptr())
    bias = None if bias is None else bias.detach().float().contiguous()
    scales = scales.detach().reshape(-1).float().contiguous()
    addresses = (packed.data_ptr(), offsets.data_ptr(), scales.data_ptr(), 0 if bias is None else bias.data_ptr())
    return VnniInt8Weight(packed, offsets, scales, bias, n_out, n_in, addresses)


def vnni_int8_rows_product(rows: torch.Tensor, row_scales: torch.Tensor | None, weight: VnniInt8Weight) -> tuple[torch.Tensor, int]:
    """``s_m · scales · (codes_m @ Wᵀ) + bias`` in fp32 for fp32 ``rows`` ``[M, K]`` (``M <= VNNI_MAX_ROWS``), where
    ``codes_m = clamp(round_half_up(rows_m / s_m), ±127)`` and ``row_scales`` holds the ``s_m`` (None: W8A8's per-token
    ``max|rows_m| / 127``, 1 for a row of zeros, found in the kernel); int32 accumulation.
    Returns the product and how many codes were clipped to ±127."""
    rows = rows.contiguous()
    m, k = rows.shape
    scales = None if row_scales is None else row_scales.reshape(-1).float().contiguous()
    if rows.dtype != torch.float32 or rows.device.type != "cpu" or not 0 < m <= VNNI_MAX_ROWS or k != weight.in_features \
            or (scales is not None and scales.numel() != m):
        raise ValueError(f"the VNNI int8 kernel takes 1-{VNNI_MAX_ROWS} fp32 CPU rows of {weight.in_features} features and one "
                         f"scale per row or none; got {tuple(rows.shape)} {rows.dtype} on {rows.device}, "
                         f"{None if scales is None else scales.numel()} scales")
    y, clipped, _ = vnni_checked_rows_product(rows, scales, weight)
    return y, clipped


class ClippedColumns(NamedTuple):
    """What clipping codes to ±127 left out of a kernel product: the input ``columns`` ``[C]`` with a code beyond ±127
    in some row, and ``excess`` ``[M, C]``, ``(q - clamp(q, ±127)) · s_m`` with ``q = round_half_up(x / s_m)``, so
    that ``product + excess @ W[:, columns]ᵀ`` is the unclipped product."""

    columns: torch.Tensor
    excess: torch.Tensor


def vnni_checked_rows_product(rows: torch.Tensor, row_scales: torch.Tensor | None, weight: VnniInt8Weight,
                              spike_threshold: tuple[float, float, float] | None = None) -> tuple[torch.Tensor, int, ClippedColumns | None]:
    """:func:`vnni_int8_rows_product` for arguments its caller has checked: contiguous fp32 CPU ``rows`` ``[M, K]``
    (``M <= VNNI_MAX_ROWS``, ``K`` the weight's), ``row_scales`` None or ``M`` contiguous fp32 values (a decode step's
    hot path: no checks here). With ``spike_threshold = (k, lo, hi)`` the ``row_scales`` are ``mean|rows_m|`` and
    each row's scale is the spiking threshold ``clamp(mean / k, lo, hi)``, computed in the kernel as PyTorch computes
    it in fp32. Also returns, with given ``row_scales`` and clipped codes, the clipped columns and their excess as
    the kernel found them (None otherwise: W8A8's own scales never clip)."""
    m, k = rows.shape
    y = torch.empty(m, weight.out_features)
    columns = excess = None
    addresses = (None, None, None)
    if row_scales is not None:  # room for every column, then their count in the last slot; the excess of each
        columns, excess = torch.empty(k + 1, dtype=torch.int64), torch.empty(k * m)
        addresses = (columns.data_ptr(), excess.data_ptr(), columns.data_ptr() + k * columns.element_size())
    clipped = _vnni_library().sb_rows(rows.data_ptr(), m, k, None if row_scales is None else row_scales.data_ptr(),
                                      *weight.addresses, y.data_ptr(), weight.out_features, kernel_threads(), *addresses,
                                      *(spike_threshold or (0.0, 0.0, 0.0)))
    if clipped < 0:
        raise MemoryError(f"the VNNI int8 kernel could not allocate {m * k} bytes")
    if not clipped or columns is None:
        return y, clipped, None
    count = int(columns[k])
    return y, clipped, ClippedColumns(columns[:count], excess[: count * m].view(count, m).t())


def vnni_codes_product(codes: torch.Tensor, row_scales: torch.Tensor, weight: VnniInt8Weight) -> torch.Tensor:
    """``s_m · scales · (codes_m @ Wᵀ) + bias`` in fp32 for int8 ``codes`` ``[M, K]`` within ±127 made by the caller (a
    prefill's spike counts, clipped) and one scale ``s_m`` per row (``row_scales`` ``[M]`` or ``[M, 1]``): the product and
    dequantisation of ``torch._int_mm`` and the integer path's fp32 scaling, in one pass."""
    m, k = codes.shape
    scales = row_scales.reshape(-1).float().contiguous()
    if codes.dtype != torch.int8 or codes.device.type != "cpu" or k != weight.in_features or scales.numel() != m:
        raise ValueError(f"the VNNI int8 kernel takes int8 CPU codes of {weight.in_features} features and one scale per row; "
                         f"got {tuple(codes.shape)} {codes.dtype} on {codes.device}, {scales.numel()} scales")
    codes = codes.contiguous()
    y = torch.empty(m, weight.out_features)
    if _vnni_library().sb_codes_product(codes.data_ptr(), m, k, scales.data_ptr(), *weight.addresses, y.data_ptr(),
                                        weight.out_features, kernel_threads()):
        raise MemoryError(f"the VNNI int8 kernel could not allocate its row buffers ({k} features)")
    return y


@functools.cache
def vnni_rows_available() -> bool:
    """Whether the VNNI kernel runs on this CPU and computes a hand-checked product (ties rounded half up, a clipped code)."""
    if _vnni_library() is None:
        return False
    codes = torch.tensor([[1, -2, 3, 0], [127, 0, -127, 5]], dtype=torch.int8)
    weight = vnni_pack_int8_weight(codes, torch.tensor([1.0, 0.25]), torch.tensor([0.5, 0.0]))
    # the row at scale 0.5 has codes 2, 3 (2.5 rounds up), 0 (-0.5 rounds up) and 127 (200 is clipped)
    y, clipped = vnni_int8_rows_product(torch.tensor([[1.0, 1.25, -0.25, 100.0]]), torch.tensor([0.5]), weight)
    expected = torch.tensor([[0.5 * (2 - 6) + 0.5, 0.125 * (254 + 635)]])
    return clipped == 1 and torch.equal(y, expected)
