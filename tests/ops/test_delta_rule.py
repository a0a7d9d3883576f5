"""Gated delta rule kernels (chunked, recurrent) against the matrix form in tests/reference_impl.py and a hand computation.

Tolerances. In fp64 every kernel agrees with the fp64 reference to rounding (we allow 1e-9). In fp32 the
chunked kernel solves a unit lower-triangular system per chunk; with unit-length keys and beta in [0, 1]
its entries are bounded by one and the solve loses a few digits at most, so 1e-4 relative to the output's
magnitude holds, while a missing correction or an off-by-one at a chunk boundary is off by order one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_impl import assert_close, delta_rule_reference
from spikingbrain.ops import chunk_delta_rule, recurrent_delta_rule
from spikingbrain.ops import gla as gla_ops

K, V = 8, 6


def make_inputs(B, T, H, Hkv, decay="moderate", dtype=torch.float64, seed=0, with_state=False):
    """Random q, unit-length k, v, log decay g, beta in (0, 1) (and an initial state)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, Hkv, K, generator=gen), dim=-1)
    v = torch.randn(B, T, Hkv, V, generator=gen)
    x = torch.randn(B, T, Hkv, K, generator=gen)
    g = {"moderate": F.logsigmoid(2 * x) / 16, "strong": -20 + x, "mixed": F.logsigmoid(3 * x) * 30}[decay]
    beta = torch.rand(B, T, Hkv, generator=gen)
    state = torch.randn(B, Hkv, K, V, generator=gen) if with_state else None
    return [t.to(dtype) for t in (q, k, v, g, beta)] + [None if state is None else state.to(dtype)]


def test_a_key_written_twice_holds_the_second_value_by_hand():
    # One head, K = 2, V = 1, scale 1. Token 1 writes v = 2 under k = e0 with beta 0.5: S = [1, 0].
    # Token 2 halves channel 0 (S' = [0.5, 0]), reads 0.5 under e0, and with beta 1 replaces it by 4: S = [4, 0].
    # Additive GLA would hold 0.5 + 4 = 4.5.
    q = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]]).view(1, 2, 1, 2)
    k = q.clone()
    v = torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)
    g = torch.log(torch.tensor([[1.0, 1.0], [0.5, 1.0]])).view(1, 2, 1, 2)
    beta = torch.tensor([0.5, 1.0]).view(1, 2, 1)
    for kernel in (chunk_delta_rule, recurrent_delta_rule):
        o, state = kernel(q, k, v, g, beta, scale=1.0, output_final_state=True)
        assert o.flatten().tolist() == [1.0, 4.0], kernel.__name__
        assert state.flatten().tolist() == [4.0, 0.0], kernel.__name__


@pytest.mark.parametrize("H,Hkv", [(6, 2), (3, 3)], ids=["gqa6x2", "mha3"])
@pytest.mark.parametrize("T", [1, 7, 64, 100])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "init-state"])
def test_kernels_match_the_matrix_form(H, Hkv, T, with_state):
    q, k, v, g, beta, state = make_inputs(2, T, H, Hkv, with_state=with_state, seed=T)
    ref_o, ref_state = delta_rule_reference(q, k, v, g, beta, initial_state=state)
    for kernel, kwargs in ((chunk_delta_rule, {"chunk_size": 16, "sub_chunk_size": 8}), (chunk_delta_rule, {}), (recurrent_delta_rule, {})):
        o, final = kernel(q, k, v, g, beta, initial_state=state, output_final_state=True, **kwargs)
        assert_close(o, ref_o, 1e-9, f"{kernel.__name__}{kwargs} output")
        assert_close(final, ref_state, 1e-9, f"{kernel.__name__}{kwargs} final state")


@pytest.mark.parametrize("decay", ["strong", "mixed"])
def test_chunks_with_strong_decays_stay_finite_and_exact(decay):
    q, k, v, g, beta, state = make_inputs(1, 80, 4, 2, decay=decay, with_state=True)
    ref_o, ref_state = delta_rule_reference(q, k, v, g, beta, initial_state=state)
    o, final = chunk_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True, chunk_size=32, sub_chunk_size=8)
    assert_close(o, ref_o, 1e-9, "output")
    assert_close(final, ref_state, 1e-9, "final state")


def test_fp32_chunks_match_the_fp64_matrix_form():
    q, k, v, g, beta, state = make_inputs(2, 150, 6, 2, dtype=torch.float32, with_state=True)
    ref_o, ref_state = delta_rule_reference(q, k, v, g, beta, initial_state=state)
    o, final = chunk_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True)
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    assert_close(o, ref_o, 1e-4, "output")
    assert_close(final, ref_state, 1e-4, "final state")


def test_long_inputs_run_in_segments_with_the_state_carried(monkeypatch):
    monkeypatch.setattr(gla_ops, "SEGMENT_TOKENS", 32)
    q, k, v, g, beta, state = make_inputs(1, 100, 2, 1, with_state=True)
    ref_o, ref_state = delta_rule_reference(q, k, v, g, beta, initial_state=state)
    o, final = chunk_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True, chunk_size=16, sub_chunk_size=8)
    assert_close(o, ref_o, 1e-9, "output")
    assert_close(final, ref_state, 1e-9, "final state")


def test_gradients_match_the_matrix_form():
    inputs = make_inputs(1, 40, 4, 2, with_state=True)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    weights = torch.randn(1, 40, 4, V, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (chunk_delta_rule(*leaves[:5], initial_state=leaves[5], chunk_size=16, sub_chunk_size=8)[0] * weights).sum().backward()
    got = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    (delta_rule_reference(*leaves[:5], initial_state=leaves[5])[0] * weights).sum().backward()
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), got, (t.grad for t in leaves)):
        assert_close(a, b, 1e-9, f"d/d{name}")


def test_a_beta_of_the_wrong_shape_is_refused():
    q, k, v, g, beta, _ = make_inputs(1, 5, 2, 1)
    with pytest.raises(ValueError, match=r"beta must be \[B, T, Hkv\]"):
        chunk_delta_rule(q, k, v, g, beta.unsqueeze(-1))
