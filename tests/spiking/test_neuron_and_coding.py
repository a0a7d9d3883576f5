"""Spiking neuron and spike coding against hand-computed values and round trips (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spikingbrain.spiking.coding import SCHEMES, decode, encode, firing_rate, time_steps
from spikingbrain.spiking.neuron import adaptive_threshold, integrate_and_fire, spike_counts, spike_quantize

floats = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_subnormal=False, width=32)  # training code may flush denormals process-wide


def test_threshold_and_counts_by_hand():
    x = torch.tensor([[3.0, -1.5, 0.0, 0.5]])  # mean |x| = 1.25, k = 2.5 -> V_th = 0.5
    counts, threshold = spike_counts(x, k=2.5)
    assert threshold.item() == 0.5
    assert counts.tolist() == [[6, -3, 0, 1]]  # 0.5 / 0.5 = 1; -1.5 / 0.5 = -3
    assert torch.equal(spike_quantize(x, k=2.5), torch.tensor([[3.0, -1.5, 0.0, 0.5]]))
    assert adaptive_threshold(torch.zeros(1, 4)).item() == pytest.approx(1e-5)  # clamped away from zero
    with pytest.raises(ValueError, match="k must be > 0"):
        adaptive_threshold(x, k=0)


def test_straight_through_gradient():
    x = torch.randn(3, 8, requires_grad=True)
    spike_quantize(x).mul(torch.arange(8.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(8.0).expand(3, 8))


@settings(max_examples=200, deadline=None)
@given(st.lists(floats, min_size=1, max_size=16), st.sampled_from([1.0, 2.5, 3.0, 4.0]))
def test_multi_step_simulation_counts_equal_the_single_step_count(values, k):
    x = torch.tensor([values])
    counts, _ = spike_counts(x, k)
    spikes, _ = integrate_and_fire(x, k)
    assert torch.equal(spikes.long().sum(0), counts.long())
    assert spikes.shape[0] == int(counts.abs().max())  # every neuron fires on consecutive steps
    assert torch.equal(spikes.abs().long().sum(0), counts.abs().long())


def test_near_ties_agree():
    # 0.49999997 + 0.5 rounds up to 1.0 in fp32: the count must still be 0, as the simulation says
    x = torch.tensor([[0.49999997, -0.49999997, 1.0, -1.0]])  # mean |x| = 0.75, k = 0.75 -> V_th = 1
    counts, threshold = spike_counts(x, k=0.75)
    assert threshold.item() == 1.0 and counts.tolist() == [[0, 0, 1, -1]]
    assert torch.equal(integrate_and_fire(x, k=0.75)[0].long().sum(0), counts.long())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-300, 300), min_size=1, max_size=12), st.sampled_from(SCHEMES))
def test_round_trips(values, scheme):
    counts = torch.tensor(values)
    if scheme in ("binary", "bitwise"):
        counts = counts.abs()
    train = encode(counts, scheme)
    assert train.shape == (time_steps(counts, scheme), *counts.shape)
    assert set(train.unique().tolist()) <= ({0, 1} if scheme in ("binary", "bitwise", "twos_complement") else {-1, 0, 1})
    assert torch.equal(decode(train, scheme), counts)


def test_time_steps_and_rates_by_hand():
    c = torch.tensor([256])
    assert [time_steps(c, s) for s in ("binary", "ternary", "bitwise", "bidirectional", "twos_complement")] == [256, 256, 9, 9, 10]
    signed = torch.tensor([-4, 3, 0])
    assert time_steps(signed, "ternary") == 4 and time_steps(signed, "twos_complement") == 3  # -4..3 fit 3 bits
    assert encode(signed, "twos_complement")[:, 0].tolist() == [1, 0, 0]  # -4 = 100
    assert firing_rate(torch.tensor([3, 0]), "binary") == 3 / 6
    assert firing_rate(torch.tensor([5]), "bitwise") == 2 / 3  # 101
    with pytest.raises(ValueError, match="unsigned"):
        encode(torch.tensor([-1]), "binary")
    with pytest.raises(ValueError, match="integers"):
        encode(torch.tensor([1.5]), "ternary")
