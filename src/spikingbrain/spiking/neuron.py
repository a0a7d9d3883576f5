"""Adaptive-threshold integrate-and-fire neurons (SpikingBrain report, section 3.3).

An activation vector ``x`` (one token's channels) gets the threshold ``V_th = mean(|x|) / k``
(clamped to ``[1e-5, 1e4]``, as in the release). The collapsed single-step neuron emits the
signed spike count ``s = floor(x / V_th + 1/2)`` (rounding half up) and the projection reads
``s · V_th``. ``integrate_and_fire`` is the multi-step view: the membrane starts at ``x / V_th``
(in threshold units), and at every step a neuron fires ``+1`` while the membrane is at least
``1/2``, ``−1`` while it is below ``−1/2``, each spike subtracting itself (soft reset), until it
rests in ``[−1/2, 1/2)``. The number of steps a neuron fires is ``|s|`` and the signed sum of
its spikes is ``s``: the collapsed form is exact, not an approximation of the simulation.
(The release rounds half to even; the two differ only when ``x / V_th`` is exactly ``n + 1/2``.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "adaptive_threshold",
    "check_firing_k",
    "round_half_up",
    "spike_counts",
    "spike_quantize",
    "integrate_and_fire",
    "SpikingInput",
    "THRESHOLD_RANGE",
]

#: Clamp of the threshold, as in the released W8ASpike code.
THRESHOLD_RANGE = (1e-5, 1e4)


def adaptive_threshold(x: torch.Tensor, k: float = 3.0) -> torch.Tensor:
    """``mean(|x|) / k`` over the last (channel) dimension, clamped, with that dimension kept."""
    return (x.abs().mean(-1, keepdim=True) / check_firing_k(k)).clamp(*THRESHOLD_RANGE)


def check_firing_k(k: float) -> float:
    """``k``, or a ValueError naming it where it is not positive."""
    if k <= 0:
        raise ValueError(f"firing-rate parameter k must be > 0, got {k}")
    return k


def round_half_up(q: torch.Tensor) -> torch.Tensor:
    """``floor(q + 1/2)`` exactly, in ``q``'s dtype: round half to even, then lift the ties it rounded down."""
    rounded = torch.round(q)
    return rounded + (q - rounded == 0.5).to(q.dtype)  # q - round(q) is exact in floating point


def spike_counts(x: torch.Tensor, k: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts, threshold)``: signed integer spike counts ``floor(x / V_th + 1/2)`` (int32) and ``V_th``."""
    threshold = adaptive_threshold(x, k)
    return round_half_up(x / threshold).to(torch.int32), threshold


class SpikingInput(NamedTuple):
    """What a spiking neuron hands to a layer that computes with the counts itself: the raw input and ``k``."""

    x: torch.Tensor
    k: float


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, k: float) -> torch.Tensor:
        counts, threshold = spike_counts(x, k)
        return counts.to(x.dtype) * threshold

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def spike_quantize(x: torch.Tensor, k: float = 3.0) -> torch.Tensor:
    """``counts · V_th``, what a projection sees from a spiking input; the gradient passes straight through."""
    return _StraightThrough.apply(x, k)


def integrate_and_fire(x: torch.Tensor, k: float = 3.0, max_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulate the multi-step neuron; returns ``(spikes [T, *x.shape] in {-1, 0, 1}, threshold)``.

    Runs until every neuron rests (``T`` = the largest ``|count|``) or ``max_steps``.
    """
    threshold = adaptive_threshold(x, k)
    membrane = (x / threshold).double()  # threshold units: subtracting whole spikes is exact
    spikes = []
    while max_steps is None or len(spikes) < max_steps:
        fire = (membrane >= 0.5).to(torch.int8) - (membrane < -0.5).to(torch.int8)
        if not fire.any():
            break
        membrane = membrane - fire
        spikes.append(fire)
    if not spikes:
        return torch.zeros((0, *x.shape), dtype=torch.int8), threshold
    return torch.stack(spikes), threshold
