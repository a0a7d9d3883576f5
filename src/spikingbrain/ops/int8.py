"""Integer matrix products on CPU: whether ``torch._int_mm`` (int8 × int8 -> int32) works on a device, and oneDNN's int8
linear (``torch.ops.onednn.qlinear_pointwise``) for one row against a wide weight."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

__all__ = ["int8_matmul_available", "OneDnnInt8Weight", "onednn_int8_linear_available", "onednn_pack_int8_weight", "onednn_int8_row_product"]


@functools.cache
def _probe(device_type: str) -> bool:
    try:
        a = torch.ones(17, 8, dtype=torch.int8, device=device_type)
        return bool((torch._int_mm(a, a.t().contiguous()) == 8).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def int8_matmul_available(device: torch.device | str) -> bool:
    """Whether ``torch._int_mm`` works on ``device`` (CPU only: elsewhere its shape limits are not handled here)."""
    device_type = torch.device(device).type
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
