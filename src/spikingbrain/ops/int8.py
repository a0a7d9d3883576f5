"""Integer matrix products: int8 × int8 with int32 accumulation (``torch._int_mm``), for integer inputs of any size.

An integer-valued input beyond ±127 is split into base-128 digits, ``v = low + 128 · carry``
with ``low`` in [-127, 127] (``carry`` is non-zero only where ``|v| > 127``), so that
``v @ W = low @ W + 128 · (carry @ W)`` holds exactly; only the rows that have a carry pay
for the further product (in int64, so nothing overflows).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["int8_matmul_available", "split_digits", "integer_matmul"]


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


def split_digits(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low int8, carry)`` of integer-valued ``values`` with ``values = low + 128 · carry``; ``carry`` is 0 where ``|values| <= 127``."""
    carry = torch.where(values.abs() > 127, torch.floor((values + 64) / 128), torch.zeros((), dtype=values.dtype))
    return (values - 128 * carry).to(torch.int8), carry


def integer_matmul(values: torch.Tensor, codes_t: torch.Tensor) -> torch.Tensor:
    """Exact ``values @ codes_t`` (int64 ``[M, N]``) of integer-valued float ``values`` ``[M, K]`` and int8 ``codes_t`` ``[K, N]``."""
    low, carry = split_digits(values)
    product = torch._int_mm(low, codes_t).long()
    rows = carry.ne(0).any(-1).nonzero().squeeze(1)
    if rows.numel():
        product.index_add_(0, rows, 128 * integer_matmul(carry[rows], codes_t))
    return product
