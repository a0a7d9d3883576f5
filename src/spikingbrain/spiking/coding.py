"""Spike coding: integer spike counts to spike trains ``[T, ...]`` and back (SpikingBrain report, section 3.3.2).

- ``binary``: unsigned counts, one ``1`` per step until the count is spent (``T`` = largest count).
- ``ternary``: signed counts, one ``±1`` per step (``T`` = largest ``|count|``).
- ``bitwise``: unsigned counts bit by bit, most significant first; step ``t`` of ``T`` weighs ``2^(T-1-t)``.
- ``bidirectional``: the bits of ``|count|`` carried by ``±1`` spikes with the count's sign.
- ``twos_complement``: signed counts in ``T`` bits, the first (sign) bit weighing ``-2^(T-1)``.

Every encoder is lossless: ``decode(encode(c)) == c``.
"""

from __future__ import annotations

import torch

__all__ = ["SCHEMES", "encode", "decode", "time_steps", "steps_for_range", "firing_rate"]

SCHEMES = ("binary", "ternary", "bitwise", "bidirectional", "twos_complement")


def _check(counts: torch.Tensor, scheme: str) -> torch.Tensor:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown spike coding {scheme!r}; use one of {list(SCHEMES)}")
    if counts.is_floating_point() or counts.is_complex():
        raise ValueError(f"spike counts must be integers, got {counts.dtype}")
    counts = counts.long()
    if scheme in ("binary", "bitwise") and bool((counts < 0).any()):
        raise ValueError(f"{scheme} coding is unsigned but the counts have negative values; use ternary, bidirectional or twos_complement")
    return counts


def time_steps(counts: torch.Tensor, scheme: str) -> int:
    """Steps ``T`` the scheme needs for these counts."""
    counts = _check(counts, scheme)
    low, high = (int(counts.min()), int(counts.max())) if counts.numel() else (0, 0)
    return steps_for_range(low, high, scheme)


def steps_for_range(low: int, high: int, scheme: str) -> int:
    """Steps ``T`` the scheme needs for counts between ``low`` and ``high``."""
    largest = max(abs(low), abs(high))
    if scheme in ("binary", "ternary"):
        return largest
    if scheme in ("bitwise", "bidirectional"):
        return largest.bit_length()
    return max(high.bit_length(), (-low - 1).bit_length() if low < 0 else 0) + 1


def encode(counts: torch.Tensor, scheme: str) -> torch.Tensor:
    """The spike train ``[T, *counts.shape]`` (int8 values in {0, 1} or {-1, 0, 1})."""
    counts = _check(counts, scheme)
    T = time_steps(counts, scheme)
    steps = torch.arange(T).view(-1, *([1] * counts.dim()))
    if scheme == "binary":
        return (steps < counts).to(torch.int8)
    if scheme == "ternary":
        return ((steps < counts.abs()).long() * counts.sign()).to(torch.int8)
    if scheme == "bitwise":
        return ((counts >> (T - 1 - steps)) & 1).to(torch.int8)
    if scheme == "bidirectional":
        return (((counts.abs() >> (T - 1 - steps)) & 1) * counts.sign()).to(torch.int8)
    return ((counts & ((1 << T) - 1)) >> (T - 1 - steps) & 1).to(torch.int8)  # two's complement bits


def decode(train: torch.Tensor, scheme: str) -> torch.Tensor:
    """Counts (int64) from a spike train made by ``encode(., scheme)``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown spike coding {scheme!r}; use one of {list(SCHEMES)}")
    train = train.long()
    T = train.shape[0]
    if scheme in ("binary", "ternary"):
        return train.sum(0)
    weights = (2 ** torch.arange(T - 1, -1, -1)).view(-1, *([1] * (train.dim() - 1)))
    if scheme == "twos_complement" and T:
        weights = weights.clone()
        weights[0] = -weights[0]
    return (train * weights).sum(0)


def firing_rate(counts: torch.Tensor, scheme: str) -> float:
    """Spikes per neuron per time step (0 when no step is needed)."""
    train = encode(counts, scheme)
    return float(train.abs().sum()) / train.numel() if train.numel() else 0.0
