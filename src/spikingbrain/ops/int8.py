"""Integer matrix products on CPU: whether ``torch._int_mm`` (int8 × int8 -> int32) works on a device, and oneDNN's int8
linear (``torch.ops.onednn.qlinear_pointwise``) for one row against a wide weight."""

from __future__ import annotations

import functools

import torch

__all__ = ["int8_matmul_available", "onednn_int8_linear_available", "onednn_pack_int8_weight", "onednn_int8_row_product"]


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


def onednn_pack_int8_weight(codes: torch.Tensor) -> torch.Tensor:
    """INT8 weight codes ``[N, K]`` packed by oneDNN for :func:`onednn_int8_row_product`."""
    return torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)


def onednn_int8_row_product(codes: torch.Tensor, scale: float, packed: torch.Tensor, weight_scales: torch.Tensor) -> torch.Tensor:
    """``scale · weight_scales · (codes @ Wᵀ)`` in fp32 for one row of int8 ``codes`` ``[1, K]`` (in ±127) and a weight
    packed by :func:`onednn_pack_int8_weight`, with per-output-channel ``weight_scales`` ``[N]``, int32 accumulation.

    oneDNN takes the row as uint8 with zero point 128 (its int8 activations measured 400x slower here)."""
    shifted = (codes.to(torch.int16) + 128).to(torch.uint8)
    zero_points = torch.zeros(weight_scales.shape[0], dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(shifted, scale, 128, packed, weight_scales, zero_points, None, 1.0, 0,
                                              torch.float32, "none", [], "")


@functools.cache
def onednn_int8_linear_available() -> bool:
    """Whether this torch build has oneDNN's int8 linear on CPU and it computes a hand-checked product."""
    try:
        codes = torch.tensor([[1, -2, 3], [127, 0, -127]], dtype=torch.int8)
        row = torch.tensor([[2, 5, -1]], dtype=torch.int8)
        y = onednn_int8_row_product(row, 0.5, onednn_pack_int8_weight(codes), torch.tensor([1.0, 0.25]))
        return torch.equal(y, torch.tensor([[0.5 * (2 - 10 - 3), 0.125 * (254 + 127)]]))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
