"""Whether int8 × int8 matrix products with int32 accumulation (``torch._int_mm``) work on a device."""

from __future__ import annotations

import functools

import torch

__all__ = ["int8_matmul_available"]


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
